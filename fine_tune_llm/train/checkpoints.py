"""Checkpoints that are either complete or ignored.

The Trainer writes checkpoint-N/ file by file; a kill during that write leaves a folder that looks like a
checkpoint but is not. After every save we write a COMPLETE.json marker (each file's size and SHA-256) last,
atomically (write a temporary file, fsync, rename), and resume only from the newest checkpoint whose marker
matches what is on disk. Older complete checkpoints stay as fallbacks; the Trainer keeps the last
`save_total_limit` of them.

A save that cannot fit is refused before it starts (a free-space check against the last checkpoint's size), and
one that runs out of space midway is removed: either way the run stops with one message naming the path, the
space needed and free, and the last complete checkpoint a re-run resumes from (`save_or_stop`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..config import field_defaults
from ..errors import ConfigError, DiskFull
from ..files import disk_full, free_bytes, is_disk_full, sha256_file
from ..run import CHECKPOINT, RunDir

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
# What a checkpoint holds beyond the adapter folder's files: the state that resumes training.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state", "trainer_state.json", MARKER)


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


# --- a full disk ----------------------------------------------------------------------------------------------

def recorded_sizes(folder: Path) -> dict[str, int]:
    """File sizes a checkpoint's marker records (no hashing: cheap enough before every save)."""
    try:
        files = json.loads((Path(folder) / MARKER).read_text())["files"]
        return {name: int(f["size"]) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def expected_bytes(run: RunDir, model, adapter_only: bool = False) -> int:
    """At least what the next save takes: the newest checkpoint's recorded size (its adapter files alone for the
    adapter folder), else the trainable weights' size."""
    for folder in run.checkpoints():
        sizes = recorded_sizes(folder)
        if adapter_only:
            sizes = {n: b for n, b in sizes.items() if not n.startswith(TRAINING_STATE)}
        if sizes:
            return sum(sizes.values())
    return trainable_bytes(model)


def save_or_stop(write: Callable[[], None], folder: Path, need: int, agree: Callable[[bool], bool], main: bool,
                 label: str) -> None:
    """Write `folder` (a checkpoint, the adapter's staging folder) with `write()`, on every rank. A save that cannot
    fit (`need` bytes, checked first) or runs out of space midway leaves no partial folder, and every rank stops
    with one message; `agree` makes the ranks decide together, so none waits forever for one that stopped."""
    free = free_bytes(folder.parent)
    if not agree(need <= free):
        raise _stopped(folder, label, need, free, started=False)
    ok = True
    try:
        write()
    except Exception as exc:
        if not is_disk_full(exc, folder.parent):
            raise
        ok, free = False, free_bytes(folder.parent)
    if not agree(ok):
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        raise _stopped(folder, label, need, free, started=True)


def _stopped(folder: Path, label: str, need: int, free: int, started: bool) -> DiskFull:
    run = RunDir.of(folder.parent)
    good = last_good_checkpoint(run)
    done = f"What was written of {label} was removed" if started else f"Nothing of {label} was written"
    then = (f"the last complete checkpoint is {good}: free some space and run the same command again, it resumes "
            f"from there." if good else "no checkpoint is complete yet: free some space and run the same command "
            "again (it starts over).")
    return disk_full(run.path, need, f"saving {label}", f"{done}; {then}", free=free)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
