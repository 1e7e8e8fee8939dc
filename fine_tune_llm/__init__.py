"""fine-tune-llm: QLoRA fine-tuning of chat models, honest evaluation, verified release."""

__version__ = "0.1.0"
