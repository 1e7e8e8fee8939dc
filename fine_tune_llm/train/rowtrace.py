"""A debug trace of which data rows each process trained on, and which files it wrote.

Off unless FINE_TUNE_LLM_TRACE_ROWS=1. The multi-process test uses it to check, from the batches themselves,
that DDP ranks see disjoint rows, and (with FINE_TUNE_LLM_TRACE_WRITES=1, via a Python audit hook) that only
the main process writes the adapter, logs and CSVs. Each rank writes <run_dir>/trace/rank<N>.json at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..run import RunDir

ENV = "FINE_TUNE_LLM_TRACE_ROWS"
WRITES_ENV = "FINE_TUNE_LLM_TRACE_WRITES"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def start(train_ds) -> RowTrace | None:
    """A RowTrace for a tokenized split that still has its `row` column, or None when tracing is off."""
    return RowTrace(train_ds) if enabled() else None


class RowTrace:
    def __init__(self, train_ds):
        # The batch carries only token ids: map each tokenized example back to its row in the data file.
        self.by_ids = {tuple(ids): row for ids, row in zip(train_ds["input_ids"], train_ds["row"])}
        self.steps: list[dict[str, Any]] = []
        self.written: set[str] = set()
        if os.environ.get(WRITES_ENV) == "1":  # an audit hook stays for the life of the process: opt in
            sys.addaudithook(self._audit)  # Python-level opens for writing, mkdir and rename

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int)
                                                                               and flags & _WRITE_FLAGS):
                self.written.add(os.path.abspath(os.fspath(args[0])))
        elif event in ("os.rename", "os.mkdir") and args:
            # os.rename and os.replace: (src, dst, src_dir_fd, dst_dir_fd); the written path is dst
            target = args[1] if event == "os.rename" else args[0]
            if isinstance(target, (str, os.PathLike)):
                self.written.add(os.path.abspath(os.fspath(target)))

    def record(self, inputs: dict[str, Any], step: int) -> None:
        ids = inputs["input_ids"]
        rows = []
        for n in range(ids.shape[0]):
            seq = ids[n]
            if "position_ids" in inputs and "attention_mask" not in inputs:  # padding-free: starts at position 0
                starts = (inputs["position_ids"][n] == 0).nonzero().flatten().tolist() + [seq.shape[0]]
                pieces = [seq[a:b] for a, b in itertools.pairwise(starts)]
            else:
                pieces = [seq[inputs["attention_mask"][n].bool()]]
            rows += [self.by_ids.get(tuple(p.tolist()), -1) for p in pieces]
        self.steps.append({"step": step, "rows": rows})

    def write(self, run: RunDir, rank: int) -> Path:
        out = run.trace_dir / f"rank{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        record = {"rank": rank, "pid": os.getpid(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                  "backend": backend, "steps": self.steps, "written": sorted(self.written)}
        out.write_text(json.dumps(record, indent=1))
        return out
