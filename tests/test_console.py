"""What a user sees: the demo's console is quiet and readable in a log, and the demo leaves the checkout clean."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

from tests.cli_runs import env
from tests.conftest import REPO


def test_a_bar_in_a_log_prints_a_line_per_tenth_at_most_once_a_second(monkeypatch):
    from fine_tune_llm import console

    clock = iter(range(0, 1000, 1))  # each update one second later
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    bar = console.PlainProgress(total=20, desc="scoring", unit="batch", stream=out)
    for _ in range(20):
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("scoring: 10% (2/20 batch") and "100% (20/20" in lines[-1]
    fast = io.StringIO()
    monkeypatch.setattr(console.time, "monotonic", lambda: 5.0)  # a phase over within a second prints nothing
    quick = console.PlainProgress(range(20), desc="quick", stream=fast)
    assert list(quick) == list(range(20)) and fast.getvalue() == ""


def test_a_training_log_is_one_compact_line():
    from fine_tune_llm.train.progress import format_log

    logs = {"loss": 6.5485, "grad_norm": 0.7966, "learning_rate": 0.002382, "num_tokens": 11380.0, "epoch": 0.62}
    assert format_log(10, 30, logs, 3120.4) == "step 10/30  loss 6.5485  lr 2.38e-03  grad 0.80  3,120 tok/s"
    assert format_log(10, 250, {"eval_loss": 6.446, "eval_runtime": 0.1}, None) == "step  10/250  eval loss 6.4460"
    assert format_log(30, 30, {"train_runtime": 3.6, "train_loss": 6.27}, None) is None
    dpo = {"loss": 0.6931, "rewards/margins": 0.0125, "rewards/accuracies": 0.5}
    assert format_log(2, 20, dpo, None) == "step  2/20  loss 0.6931  margin 0.013  accuracy 0.500"


def test_library_noise_is_filtered_by_message_and_nothing_else():
    from fine_tune_llm.console import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # idempotent: one filter
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    bnb.addHandler(handler)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        bnb.warning("something a user can act on")
    finally:
        bnb.removeHandler(handler)
    assert stream.getvalue() == "something a user can act on\n"
    sorting = logging.getLogger("transformers.trainer_utils")
    assert not sorting.filters[0].filter(logging.makeLogRecord(
        {"msg": "mtime may not be reliable on this filesystem, falling back to numerical ordering"}))
    assert sorting.filters[0].filter(logging.makeLogRecord({"msg": "Deleting older checkpoint"}))
    # lm-eval: its INFO narration is off, and of its warnings only the two about being handed a loaded model go.
    hflm = logging.getLogger("lm_eval.models.huggingface")
    assert logging.getLogger("lm_eval").level == logging.WARNING and len(hflm.filters) == 2
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    hflm.addHandler(handler)
    try:
        hflm.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        hflm.warning("Passed an already-initialized model through `pretrained`, assuming single-process call")
        hflm.info("Using device 'cpu'")
        hflm.warning("Combined length of context (9) and continuation (9) exceeds model's maximum length (8).")
    finally:
        hflm.removeHandler(handler)
    assert stream.getvalue() == "Combined length of context (9) and continuation (9) exceeds model's maximum length (8).\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        quiet_libraries()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("another deprecation", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["another deprecation"]


def test_the_demo_is_quiet_and_leaves_the_checkout_clean():
    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    before = status()
    out = subprocess.run([sys.executable, "-m", "fine_tune_llm", "demo"], cwd=REPO, env=env(), capture_output=True,
                         check=False, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert status() == before, "the demo changed files git sees"
    for noise in ("kernels-community", "Warning", "warnings.warn", "{'loss'", "{'eval_loss'", "\r"):
        assert noise not in text, f"{noise!r} in the demo's output:\n{text[-3000:]}"
    assert "step 30/30  loss" in text and "eval loss" in text and "perplexity" in text
