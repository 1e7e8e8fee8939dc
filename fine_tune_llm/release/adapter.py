"""Stage 1: the LoRA adapter as a release folder - weights, tokenizer with its chat template, a generation
config that stops at the end of the turn, the training settings, and a model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from ..errors import ReleaseCheckFailed
from ..files import folder_bytes
from ..model.generation import generation_config
from ..run import ADAPTER_CONFIG_FILE
from .checks import check_common, check_tokenizer
from .common import (
    CheckResult,
    RunFiles,
    checked_adapter,
    locate_run,
    public_config,
    release_lock,
    save_tokenizer,
    staged,
    tokenizer_model_source,
)
from .modelcard import is_psychology, require_license, write_card

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def release_adapter(run_or_adapter: str | Path, out_dir: str | Path | None = None, *, license: str | None = None,
                    dataset_id: str | None = None, tokenizer_model: str | Path | None = None,
                    base_model_id: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapter release folder (default: RUN/release/adapter), check it, and return its path."""
    run = locate_run(run_or_adapter, base_model_id)
    require_license(run, license)
    for name in ADAPTER_FILES:
        if not (run.adapter_dir / name).is_file():
            raise ReleaseCheckFailed(f"{run.adapter_dir / name} is missing: did training finish and save the "
                                     f"adapter?")
    final = Path(out_dir) if out_dir else run.release_dir("adapter")
    with release_lock(checked_adapter(run), "adapter"), \
            staged(final, overwrite, need=folder_bytes(run.adapter_dir)) as out:
        _write_release(out, run, license, dataset_id, tokenizer_model)
        check_adapter(out).raise_if_failed()
    log.info("adapter release: %s", final)
    return final


def _write_release(out: Path, run: RunFiles, license: str | None, dataset_id: str | None, tokenizer_model) -> None:
    from transformers import AutoTokenizer

    for name in ADAPTER_FILES:
        shutil.copyfile(run.adapter_dir / name, out / name)
    _point_at_hub_base(out / "adapter_config.json", run)
    tok = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    save_tokenizer(tok, out, tokenizer_model_source(run.cfg, tokenizer_model))
    # Rebuilt rather than copied: an older run's file may list <eos> alone and never stop at <end_of_turn>.
    generation_config(tok, _saved_generation_config(run.adapter_dir)).save_pretrained(str(out))
    (out / ADAPTER_CONFIG_FILE).write_text(yaml.safe_dump(public_config(run.cfg), sort_keys=False))
    goal = "questions about emotional difficulties with empathy" if is_psychology(run.cfg) else \
        "like its training data"
    summary = (f"A LoRA adapter for [`{run.base_id}`]({_hub_url(run.base_id)}), trained with QLoRA "
               f"to answer {goal}. Load it on top of the base model with PEFT.")
    write_card(out, "adapter", run, summary, license=license, dataset=dataset_id)


def check_adapter(folder: str | Path) -> CheckResult:
    from safetensors import safe_open

    folder = Path(folder)
    result = CheckResult(folder, "adapter")
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            result.errors.append(f"{name} is missing")
    if (folder / "adapter_model.safetensors").is_file():
        try:
            with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
                keys = list(f.keys())
            if not any("lora_A" in k for k in keys) or not any("lora_B" in k for k in keys):
                result.errors.append("adapter_model.safetensors holds no lora_A/lora_B weights")
            result.facts["tensors"] = len(keys)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a failed check, reported with its cause
            result.errors.append(f"adapter_model.safetensors does not read ({type(exc).__name__}: {exc})")
    if (folder / "adapter_config.json").is_file():
        try:
            conf = json.loads((folder / "adapter_config.json").read_text())
            if conf.get("peft_type") != "LORA":
                result.errors.append(f"adapter_config.json peft_type is {conf.get('peft_type')!r}, expected 'LORA'")
        except ValueError as exc:
            result.errors.append(f"adapter_config.json is not valid JSON ({exc})")
    check_tokenizer(result)
    check_common(result, "adapter")
    return result


def _point_at_hub_base(path: Path, run: RunFiles) -> None:
    """adapter_config.json names the base by where training loaded it (maybe a folder of this machine); a
    release names it by its Hub id, which is what PEFT downloads elsewhere."""
    conf = json.loads(path.read_text())
    if conf.get("base_model_name_or_path") != run.base_id:
        conf["base_model_name_or_path"] = run.base_id
        path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _saved_generation_config(adapter_dir: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError):
        return None


def _hub_url(model: str) -> str:
    from .common import is_hub_id

    return f"https://huggingface.co/{model}" if is_hub_id(model) else "#"
