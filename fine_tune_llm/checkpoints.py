"""Checkpoints that are either complete or ignored.

The Trainer writes checkpoint-N/ file by file; a kill during that write leaves a folder that looks like a
checkpoint but is not. We write a COMPLETE marker (file names and sizes) last, atomically, and resume only
from the newest checkpoint whose marker matches what is on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def write_marker(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER}
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(files, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
             if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_good_checkpoint(run_dir: Path) -> Path | None:
    for folder in checkpoints_newest_first(run_dir):
        if is_complete(folder):
            return folder
        log.warning("ignoring incomplete checkpoint %s (no valid %s: the run died while saving it)",
                    folder, MARKER)
    return None


def resume_point(run_dir: Path, resume: bool | str | None) -> str | None:
    """None: resume if a good checkpoint exists; True: must resume; False: start fresh; str: that checkpoint."""
    if resume is False:
        return None
    if isinstance(resume, str):
        return resume
    good = last_good_checkpoint(run_dir)
    if good is None and resume is True:
        from .errors import ConfigError

        raise ConfigError(f"--resume: no complete checkpoint in {run_dir}")
    if good is not None:
        log.info("resuming from %s", good)
    return str(good) if good else None


def make_callback():
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_marker(folder)
            return control

    return CompletionMarker()


def CompletionMarker():  # noqa: N802 - reads like the callback class it returns
    return make_callback()
