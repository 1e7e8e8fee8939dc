"""manifest.json: everything needed to say how a run was made (config, code, libraries, data, hardware).

Revisions are what pins the bytes: a Hub commit hash for Hub models and datasets (from the local Hub cache, or
the Hub when online), a SHA-256 of the files for local models and data. None means "not known", never a guess.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .files import sha256_file, write_json
from .run import RunDir

LIBRARIES = ["torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "tokenizers",
             "safetensors", "huggingface-hub"]
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
    # Tracked files only: run directories and caches are untracked and would make every run look dirty.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None and commit else None}


def lock_hash() -> str | None:
    lock = REPO / "poetry.lock"
    return sha256_file(lock) if lock.is_file() else None


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": cpu_name(), "cpu_count": _cpu_count(), "torch_threads": torch.get_num_threads(),
                            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def build_manifest(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    from .data.rows import resolve_source
    from .model.loading import model_source

    source, kwargs = model_source(cfg)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": cfg.to_dict(),
        "git": git_state(),
        "poetry_lock_sha256": lock_hash(),
        "libraries": library_versions(),
        "model": {"id": cfg.base_model, "revision": revision(source, "model", kwargs.get("gguf_file"))},
        "dataset": {"id": cfg.dataset, "revision": revision(resolve_source(cfg.dataset), "dataset")},
        "hardware": hardware(),
        **extra,
    }


def revision(source: str, repo_type: str, gguf_file: str | None = None) -> str | None:
    """SHA-256 of a local file or directory, else the Hub commit hash, else None."""
    path = Path(source).expanduser()
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return _dir_hash(path, only=gguf_file)
    return _hub_commit(source, repo_type)


def _dir_hash(folder: Path, only: str | None = None) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (only is None or p.name == only or p.suffix != ".gguf"):
            digest.update(f"{p.relative_to(folder)}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def _hub_commit(repo_id: str, repo_type: str) -> str | None:
    """The snapshot in the local Hub cache (what was actually loaded), else ask the Hub unless offline."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache

        for name in ("config.json", "README.md"):
            cached = try_to_load_from_cache(repo_id, name, repo_type=repo_type)
            if isinstance(cached, str) and "/snapshots/" in cached:
                return cached.split("/snapshots/")[1].split("/")[0]
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        api = HfApi()
        info = api.model_info(repo_id, timeout=10) if repo_type == "model" else api.dataset_info(repo_id, timeout=10)
        return info.sha
    except Exception:  # noqa: BLE001 - offline, gated, not found: unknown, and the run goes on
        return None


def write_manifest(cfg: TrainConfig, run: RunDir | Path, **extra: Any) -> Path:
    """Write manifest.json; a resumed run keeps the first manifest and appends what changed in `resumes`."""
    path = RunDir.of(run).manifest_file
    manifest = build_manifest(cfg, **extra)
    if extra.get("resumed_from") and path.is_file():
        try:
            first = json.loads(path.read_text())
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict):
            resumes = first.pop("resumes", [])
            resumes.append({k: manifest[k] for k in ("created", "command", "git", "libraries", "hardware",
                                                     "resumed_from")})
            manifest = {**manifest, "resumes": resumes, "created": first.get("created", manifest["created"])}
    return write_json(path, manifest)
