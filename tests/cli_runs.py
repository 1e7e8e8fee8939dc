"""Small helpers for tests that run `python -m fine_tune_llm train` in a subprocess (crash, signal, DDP tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# About a second a step on 2 cores: 24 rows (19 train) in batches of 4 = 5 steps an epoch, so 6 steps
# cross an epoch boundary (the resumed data order must survive it). Answers are cut at 96 tokens.
SMALL = ["--preset", "tiny", "--data-samples", "24", "--max-length", "96", "--batch-size", "4",
         "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1", "--eval-steps", "100",
         "--save-total-limit", "2"]


def run_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL, "--output-dir", str(tmp / name), "--metrics-dir", str(tmp / name / "metrics"),
            "--imgs-dir", str(tmp / name / "imgs"), *extra]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def start(args: list[str], log: Path, command: tuple[str, ...] = ("fine_tune_llm", "train"),
          **extra_env: str) -> subprocess.Popen:
    """`python -m fine_tune_llm train ARGS` (or another module and its arguments), logging to `log`."""
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", *command, *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env(**extra_env), cwd=REPO)


def run(args: list[str], log: Path, timeout: float = 600, command: tuple[str, ...] = ("fine_tune_llm", "train"),
        **extra_env: str) -> int:
    proc = start(args, log, command, **extra_env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until `path` exists, failing early with the log if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss, from the trainer state the run wrote at the end."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))
