"""The command line: the GPU preset fails fast and clearly on CPU; errors carry no traceback."""

import subprocess
import sys
import time

from tests.conftest import REPO


def run_cli(*args, timeout=120):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fine_tune_llm", *args], cwd=REPO, capture_output=True, check=False,
                          text=True, timeout=timeout, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    return proc, time.time() - t0


def test_default_preset_on_cpu_stops_in_seconds_naming_the_offline_preset():
    proc, seconds = run_cli("train")
    assert proc.returncode == 2
    assert "preset 'gemma-2b-it' (google/gemma-2b-it) needs a CUDA GPU" in proc.stderr
    assert "--preset tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 60  # seconds, not a hang: most of it is importing torch on a busy machine


def test_unknown_preset_and_bad_flag_value_are_named():
    proc, _ = run_cli("train", "--preset", "gemma-7b")
    assert proc.returncode == 2 and "invalid choice: 'gemma-7b'" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = run_cli("train", "--preset", "tiny", "--learning-rate", "fast")
    assert proc.returncode == 2 and "option 'learning_rate': cannot read 'fast'" in proc.stderr


def test_offline_hub_model_is_refused_with_the_offline_preset_named():
    proc, _ = run_cli("train", "--preset", "smollm2-135m")
    assert proc.returncode == 2
    assert "HuggingFaceTB/SmolLM2-135M-Instruct is not a local path and HF_HUB_OFFLINE=1" in proc.stderr
    assert "--preset tiny" in proc.stderr
