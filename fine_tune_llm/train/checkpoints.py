"""Checkpoints that are either complete or ignored.

The Trainer writes checkpoint-N/ file by file; a kill during that write leaves a folder that looks like a
checkpoint but is not. After every save we write a COMPLETE.json marker (each file's size and SHA-256) last,
atomically (write a temporary file, fsync, rename), and resume only from the newest checkpoint whose marker
matches what is on disk. Older complete checkpoints stay as fallbacks; the Trainer keeps the last
`save_total_limit` of them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config import field_defaults
from ..errors import ConfigError
from ..files import sha256_file
from ..run import CHECKPOINT, RunDir

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"


def write_marker(folder: Path) -> None:
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(MARKER)}
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)


def invalidate(folder: Path) -> None:
    """Drop a marker before its folder is written again (a resumed run re-saving a step)."""
    for name in (MARKER, MARKER + ".tmp"):
        (Path(folder) / name).unlink(missing_ok=True)


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when every file matches its marker."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the run died while saving it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    for name, want in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {want['size']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def is_complete(folder: Path) -> bool:
    return problem(folder) is None


def step_of(folder: Path) -> int | None:
    m = CHECKPOINT.match(Path(folder).name)
    return int(m.group(1)) if m else None


def last_good_checkpoint(run: RunDir | str | Path) -> Path | None:
    for folder in RunDir.of(run).checkpoints():
        why = problem(folder)
        if why is None:
            return folder
        log.warning("ignoring checkpoint %s: %s; falling back to an earlier one", folder, why)
    return None


# Options that may change between a run and its resumption: where things go, how long, how often to log.
RESUMABLE_CHANGES = {"output_dir", "metrics_dir", "imgs_dir", "max_steps", "num_epochs", "logging_steps",
                     "eval_steps", "save_steps", "save_total_limit"}


def resume_point(run: RunDir | str | Path, resume: bool | str | None, cfg=None) -> str | None:
    """None: resume if a good checkpoint exists; True: must resume; False: start fresh; str: that checkpoint."""
    if resume is False:
        return None
    if isinstance(resume, (str, Path)):
        why = problem(Path(resume)) if Path(resume).is_dir() else "not a directory"
        if why:
            raise ConfigError(f"--resume {resume}: cannot resume from it: {why}")
        good: Path | None = Path(resume)
    else:
        good = last_good_checkpoint(run)
        if good is None and resume is True:
            raise ConfigError(f"--resume: no complete checkpoint in {run}")
    if good is None:
        return None
    if cfg is not None:
        check_same_config(run, cfg)
    log.info("resuming from %s", good)
    return str(good)


def check_same_config(run: RunDir | str | Path, cfg) -> None:
    """A checkpoint continues the run that made it: a changed learning rate or batch size would silently
    splice two different runs into one curve."""
    run = RunDir.of(run)
    now = cfg.to_dict()
    # A field the run's config.yaml lacks was added since: the run had the behaviour of its default.
    added = {k: v for k, v in field_defaults().items() if k != "preset"}
    before = {**added, **run.read_config_values()}
    changed = sorted(k for k in now if k in before and before[k] != now[k] and k not in RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"{run} holds checkpoints of a run with other options ({detail}). Pass --no-resume "
                          f"to start over there, or choose another --output-dir.")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
