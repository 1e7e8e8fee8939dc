"""The CPU trainer hands freed memory back to the OS (trainer.ReturnFreedMemory): what it releases, and when."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fine_tune_llm.train import trainers as trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import rss_gb  # the benchmarks' RSS reader, from /proc


def rss_mb() -> float:
    return rss_gb() * 1024


@pytest.mark.skipif(trainer._malloc_trim() is None, reason="no glibc malloc_trim on this platform")
def test_trim_returns_freed_heap_pages():
    # 64 KB tensors come from glibc's heap (below its mmap threshold); keeping every 4th alive leaves the freed
    # ones as holes glibc does not give back by itself - what a training step's activations of varying shapes leave.
    blocks = [torch.ones(16 * 1024) for _ in range(6000)]  # 6000 x 64 KB = 375 MB, touched
    kept = blocks[::4]
    del blocks
    before = rss_mb()
    assert trainer.release_freed_memory()
    after = rss_mb()
    # Without the trim none of the freed 281 MB leaves the process; with it, at least a quarter must
    assert before - after > 0.25 * 375 * 3 / 4, (before, after)
    assert all(float(t[0]) == 1.0 for t in kept)  # and the live tensors are untouched


def test_callback_trims_every_n_steps_and_after_evaluation(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "release_freed_memory", lambda: calls.append("trim") or True)
    cb = trainer.ReturnFreedMemory(every=10)
    trimmed_at = []
    for step in range(1, 31):
        n = len(calls)
        cb.on_step_end(None, SimpleNamespace(global_step=step), None)
        if len(calls) > n:
            trimmed_at.append(step)
    cb.on_evaluate(None, SimpleNamespace(global_step=30), None)
    assert trimmed_at == [10, 20, 30]
    assert len(calls) == 4


def test_cpu_runs_get_the_trim():
    names = [type(c).__name__ for c in trainer.default_callbacks()]
    expected = ["CompletionMarker"] + ([] if torch.cuda.is_available() else ["ReturnFreedMemory"])
    assert names == expected
