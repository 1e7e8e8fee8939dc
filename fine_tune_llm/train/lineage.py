"""How a preference stage hangs on its SFT run: its config is the SFT run's (the model, data, template and
adapter may not change), its split is the SFT run's saved split, and it records the SFT adapter it started from
so a later change to that adapter is caught instead of silently mixing two models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import INHERITED, TrainConfig, make_config
from ..errors import ConfigError, DamagedFile
from ..files import json_problem, read_json, sha256_file, write_json
from ..run import RunDir

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def preference_config(sft_run: str | Path, yaml_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The dpo stage's config: the SFT run's settings, the stage's defaults, then YAML and explicit overrides."""
    sft = RunDir.of(sft_run)
    sft_cfg = sft.read_config()
    if sft_cfg.stage != "sft":
        raise ConfigError(f"{sft} is a {sft_cfg.stage} run: --sft-run takes the SFT run the preference stage "
                          f"continues")
    given = {k: v for k, v in overrides.items() if v is not None}
    changed = sorted(k for k in INHERITED if k in given and given[k] != getattr(sft_cfg, k))
    if changed:
        raise ConfigError(f"the preference stage continues {sft} and keeps its {', '.join(changed)} (the model, "
                          f"data and adapter shape must match the SFT run); train a new SFT run to change them")
    base = {**sft_cfg.to_dict(), "output_dir": f"{sft.path}-dpo"}
    given.update(stage="dpo", sft_run=str(sft.path.resolve()))
    return make_config(base=base, yaml_file=yaml_file, **given)


def adapter_hash(run: RunDir) -> str:
    weights = run.adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{run} has no trained adapter ({weights} missing): did its training finish?")
    return sha256_file(weights)


def record_parent(run: RunDir, sft: RunDir) -> None:
    """Write the link to the SFT run, and copy its saved split: the stage trains, validates and tests on
    exactly the SFT run's rows."""
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.parent_file, {"sft_run": str(sft.path.resolve()), "adapter_sha256": adapter_hash(sft)})
    shutil.copyfile(sft.splits_file, run.splits_file)


def parent_of(run: RunDir) -> RunDir | None:
    """The SFT run a preference run continued, checked: refuses one whose adapter changed since."""
    if not run.parent_file.is_file():
        return None
    record = read_json(run.parent_file) or {}
    if not all(isinstance(record.get(k), str) for k in ("sft_run", "adapter_sha256")):
        raise DamagedFile(f"{run.parent_file} cannot be read ({json_problem(run.parent_file) or 'fields missing'}): "
                          f"it names the SFT run this stage continued. Delete it and train the preference stage "
                          f"again (--no-resume): it records its SFT run anew.")
    sft = RunDir.of(record["sft_run"])
    now = adapter_hash(sft)
    if now != record["adapter_sha256"]:
        raise ConfigError(f"the SFT run {sft} this stage continued has a different adapter now (sha256 "
                          f"{now[:12]}, was {record['adapter_sha256'][:12]}): it was retrained or edited; rerun the "
                          f"preference stage from it")
    return sft
