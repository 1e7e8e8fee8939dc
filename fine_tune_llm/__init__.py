"""fine-tune-llm: QLoRA fine-tuning of chat models, honest evaluation, verified release.

The public surface is `__all__`: what the notebooks and the CLI call. Names load on first use, so importing the
package (and starting the CLI) pulls in no ML library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that owns it
_OWNERS = {
    "TrainConfig": "config", "PRESETS": "config", "make_config": "config",
    "RunDir": "run",
    "load_tokenizer": "modeling", "load_model": "modeling", "add_lora": "modeling",
    "check_environment": "hardware",
    "prepare_data": "training", "train": "training", "TrainResult": "training",
    "preference_config": "stages", "train_preference": "preference",
    "export_run": "metrics",
    "evaluate_run": "evaluation", "load_for_eval": "evaluation",
    "generate_answers": "generation", "generation_config": "generation",
    "release_adapter": "release", "merge_adapter": "release", "export_gguf": "release",
    "push_folder": "release", "check_folder": "release",
}
__all__ = ["PRESETS", "RunDir", "TrainConfig", "TrainResult", "add_lora", "check_environment", "check_folder",
           "evaluate_run", "export_gguf", "export_run", "generate_answers", "generation_config", "load_for_eval",
           "load_model", "load_tokenizer", "make_config", "merge_adapter", "preference_config", "prepare_data",
           "push_folder", "release_adapter", "train", "train_preference"]


def __getattr__(name: str) -> Any:
    if name not in _OWNERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_OWNERS[name]}", __name__), name)
