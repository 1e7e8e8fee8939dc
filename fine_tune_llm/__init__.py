"""fine-tune-llm: QLoRA fine-tuning of chat models, honest evaluation, verified release.

The public surface is `__all__`: what the notebooks and the CLI call. Names load on first use, so importing the
package (and starting the CLI) pulls in no ML library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that owns it ("module:attribute" where the public name differs: `train` is also the name of a
# subpackage, so the SFT job is `train_sft`, beside `train_preference`). The notebooks import only these names, so
# moving a module never touches them.
_OWNERS = {
    "TrainConfig": "config", "PRESETS": "config", "make_config": "config",
    "RunDir": "run",
    "build_messages": "data.chat_template", "render_prompt": "data.chat_template",
    "load_tokenizer": "model.loading", "load_model": "model.loading", "add_lora": "model.loading",
    "check_environment": "model.hardware",
    "generate_answers": "model.generation", "generation_config": "model.generation",
    "EXAMPLE_QUESTIONS": "model.generation",
    "prepare_data": "train.sft", "train_sft": "train.sft:train", "TrainResult": "train.sft",
    "preference_config": "train.lineage", "train_preference": "train.preference",
    "export_run": "train.tensorboard_export",
    "evaluate_run": "eval.evaluate", "load_for_eval": "eval.evaluate",
    "release_adapter": "release", "merge_adapter": "release", "export_gguf": "release",
    "push_folder": "release", "check_folder": "release",
    "repo_path": "notebook.paths", "interactive": "notebook.paths",
    "open_tensorboard": "notebook.tensorboard_server",
}
# name -> a module exported whole: `show` holds what the notebooks display (tables, the masked view).
_MODULES = {"show": "notebook.display"}
__all__ = ["EXAMPLE_QUESTIONS", "PRESETS", "RunDir", "TrainConfig", "TrainResult", "add_lora",
           "build_messages", "check_environment", "check_folder", "evaluate_run", "export_gguf",
           "export_run", "generate_answers", "generation_config", "interactive", "load_for_eval",
           "load_model", "load_tokenizer", "make_config", "merge_adapter", "open_tensorboard", "preference_config",
           "prepare_data", "push_folder", "release_adapter", "render_prompt", "repo_path", "show", "train_preference",
           "train_sft"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    if name not in _OWNERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = _OWNERS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), attribute or name)
