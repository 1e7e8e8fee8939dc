"""manifest.json: everything needed to say how a run was made (config, code, libraries, data, hardware)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import TrainConfig

LIBRARIES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "tokenizers"]
REPO = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def lock_hash() -> str | None:
    lock = REPO / "poetry.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cpu_count": _cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def build_manifest(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "git": git_state(),
        "poetry_lock_sha256": lock_hash(),
        "libraries": library_versions(),
        "model": {"id": cfg.base_model, "revision": _revision(cfg.base_model)},
        "dataset": {"id": cfg.dataset, "sha256": _file_hash(cfg.dataset)},
        "hardware": hardware(),
        **extra,
    }


def _revision(model_id: str) -> str | None:
    path = Path(model_id)
    return None if path.exists() else "main"


def _file_hash(source: str) -> str | None:
    from .data import resolve_source

    path = Path(resolve_source(source))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write_manifest(cfg: TrainConfig, run_dir: Path, **extra: Any) -> Path:
    path = Path(run_dir) / "manifest.json"
    path.write_text(json.dumps(build_manifest(cfg, **extra), indent=2, default=str))
    return path
