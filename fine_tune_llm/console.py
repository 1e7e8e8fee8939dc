"""What a user sees while a job runs: one progress bar per phase, readable in a terminal, a notebook and a log file,
and library noise a user cannot act on filtered at its source (each filter names its upstream cause).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

# In a log file (output not a terminal) a bar prints a plain line when it passes another tenth of its work, at most
# one a second; a phase over within a second prints nothing.
PLAIN_STEPS = 10
PLAIN_MIN_SECONDS = 1.0


def in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(iterable: Any = None, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, initial: int = 0):
    """tqdm in a terminal or a notebook; a line per tenth of the work when the output goes to a file or a pipe,
    so a log shows `scoring: 40% (8/20 batch, ...)` instead of runs of carriage returns."""
    if in_notebook():
        from tqdm.auto import tqdm
    elif sys.stderr.isatty():
        from tqdm import tqdm
    else:
        return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, dynamic_ncols=True,
                initial=initial)


class PlainProgress:
    """The subset of tqdm the package uses (iterate, update, write, close, n), as plain lines."""

    def __init__(self, iterable: Any = None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, initial: int = 0, stream=None):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start = initial, time.monotonic()
        self.printed = initial * PLAIN_STEPS // self.total if self.total else 0
        self.last_line = self.start
        self.stream = stream or sys.stderr

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or not self.total:
            return
        tenth = min(PLAIN_STEPS, self.n * PLAIN_STEPS // self.total)
        now = time.monotonic()
        if tenth > self.printed and now - self.last_line >= PLAIN_MIN_SECONDS:
            self.printed, self.last_line = tenth, now
            self.write(f"{self.desc}: {100 * self.n // self.total}% ({self.n}/{self.total} {self.unit}, "
                       f"{time.monotonic() - self.start:.0f} s)")

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _NewScoreHeadOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "SequenceClassification LOAD REPORT" not in message:
            return True
        cells = [line.split("|") for line in message.splitlines() if "|" in line]
        keys = [row[0].strip() for row in cells if row[0].strip() not in ("", "Key")]
        return not keys or any(not key.startswith("score.") for key in keys)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_libraries() -> None:
    """Filter, by exact message, what libraries print that a user of this project cannot act on. Idempotent."""
    if not sys.stderr.isatty() and not in_notebook():
        # In a log file the libraries' own bars (tokenizing, loading weights, downloads) are runs of carriage
        # returns; our phases print plain lines instead (progress above).
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    # bitsandbytes tries, on CPUs with avx512_bf16, to fetch a fused 4-bit kernel from the Hub through the optional
    # `kernels` package and warns at import when it cannot; it then uses its own CPU kernel, which is what we test.
    # Even with `kernels` installed the request names the wrong backend on a CUDA torch build:
    # https://github.com/bitsandbytes-foundation/bitsandbytes/issues/2064
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # lm-evaluation-harness narrates every task at INFO (its seeds, its contexts, a line per subtask: 57 for MMLU);
    # eval/harness.py logs one line per column instead. Its warnings still show.
    if logging.getLogger("lm_eval").level == logging.NOTSET:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # lm-evaluation-harness warns whenever it is handed a loaded model instead of a name; eval/harness.py does so on
    # purpose (the report's own columns), in one process (lm_eval/models/huggingface.py, HFLM.__init__).
    hflm = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _DropMessage) for f in hflm.filters):
        hflm.addFilter(_DropMessage("`pretrained` model kwarg is not of type `str`"))
        hflm.addFilter(_DropMessage("Passed an already-initialized model through `pretrained`"))
    # transformers reports the new one-output score head of a sequence classifier as missing from the checkpoint:
    # expected for the reward judge, whose training is what fills it (eval/reward_judge.py). Any other missing or
    # unexpected key is still reported (transformers/utils/loading_report.py, log_state_dict_report, called with
    # modeling_utils' logger).
    report = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _NewScoreHeadOnly) for f in report.filters):
        report.addFilter(_NewScoreHeadOnly())
    # transformers orders checkpoints by mtime and, when checkpoints were saved within a second of each other (short
    # runs, the tiny preset), warns that mtime "may not be reliable" and orders them by step number instead: the
    # right order, and nothing for a user to do (transformers/trainer_utils.py, sort_checkpoints).
    sorting = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _DropMessage) for f in sorting.filters):
        sorting.addFilter(_DropMessage("mtime may not be reliable on this filesystem"))
    # transformers 5 deprecated `PreTrainedModel.is_gradient_checkpointing`; peft 0.21's PeftModel.__init__ still
    # reads it (peft/peft_model.py), so every LoRA model creation warns about code we do not own.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")


__all__ = ["PlainProgress", "in_notebook", "progress", "quiet_libraries"]
