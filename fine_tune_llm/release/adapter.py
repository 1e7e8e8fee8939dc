"""Stage 1: the LoRA adapter as a release folder - weights, tokenizer with its chat template, a generation
config that stops at the end of the turn, the training settings, and a model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from .checks import check_common, check_tokenizer
from .common import (
    CheckResult,
    RunFiles,
    default_release_dir,
    fresh_dir,
    locate_run,
    public_config,
    save_tokenizer,
    tokenizer_model_source,
)
from .modelcard import split_sizes, write_card

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def release_adapter(run_or_adapter: str | Path, out_dir: str | Path | None = None, *, license: str | None = None,
                    dataset_id: str | None = None, tokenizer_model: str | Path | None = None,
                    base_model_id: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapter release folder (default: RUN/release/adapter), check it, and return its path."""
    from transformers import AutoTokenizer

    from ..training import generation_config

    run = locate_run(run_or_adapter, base_model_id)
    out = fresh_dir(out_dir or default_release_dir(run, "adapter"), overwrite)
    for name in ADAPTER_FILES:
        src = run.adapter_dir / name
        if not src.is_file():
            raise_missing(run, name)
        shutil.copyfile(src, out / name)
    _point_at_hub_base(out / "adapter_config.json", run)
    tok = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    save_tokenizer(tok, out, tokenizer_model_source(run.cfg, tokenizer_model))
    # Rebuilt rather than copied: an older run's file may list <eos> alone and never stop at <end_of_turn>.
    generation_config(tok, _saved_generation_config(run.adapter_dir)).save_pretrained(str(out))
    (out / "training_config.yaml").write_text(yaml.safe_dump(public_config(run.cfg), sort_keys=False))
    goal = "questions about emotional difficulties with empathy" if _psych(run) else "like its training data"
    summary = (f"A LoRA adapter for [`{run.base_id}`]({_hub_url(run.base_id)}), trained with QLoRA "
               f"to answer {goal}. Load it on top of the base model with PEFT.")
    write_card(out, "adapter", run, summary, license=license, dataset=dataset_id, sizes=split_sizes(run.cfg))
    check_adapter(out).raise_if_failed()
    log.info("adapter release: %s", out)
    return out


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
        except Exception as exc:
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


def raise_missing(run: RunFiles, name: str) -> None:
    from ..errors import ReleaseCheckFailed

    raise ReleaseCheckFailed(f"{run.adapter_dir / name} is missing: did training finish and save the adapter?")


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


def _psych(run: RunFiles) -> bool:
    from .modelcard import is_psychology

    return is_psychology(run.cfg)
