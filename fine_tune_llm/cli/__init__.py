"""The `fine-tune-llm` command: train, evaluate, release, and the offline demo."""

from .commands import main

__all__ = ["main"]
