"""The Hub token never reaches a file a run writes, the terminal, or an error message."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from cli_runs import REPO, env, run_args

from fine_tune_llm.errors import DataError, redact

# Fake, but shaped like real tokens; two, because the Hub client reads either variable.
TOKENS = {"HF_TOKEN": "hf_PlantedFakeToken7Qx2mZ9vK4tB8nW1cR6yL3", "HUGGING_FACE_HUB_TOKEN": "hf_SecondFakeTokenA1b2C3d4E5f6G7h8I9j0"}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fine_tune_llm", *args], cwd=REPO, env=env(**TOKENS),
                          capture_output=True, text=True, timeout=timeout, check=False)


def leaks(text_or_bytes) -> list[str]:
    data = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode()
    return [name for name, token in TOKENS.items() if token.encode() in data]


@pytest.mark.slow
def test_planted_token_appears_in_no_file_and_no_output_of_train_export_and_release(tmp_path):
    outputs = []
    train = cli("train", *run_args(tmp_path, "run", "--max-steps", "4"))
    outputs.append(train)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "run"
    outputs.append(cli("export-metrics", str(run_dir), "--metrics-dir", str(tmp_path / "m2"), "--imgs-dir",
                       str(tmp_path / "i2")))
    outputs.append(cli("release", "adapter", str(run_dir), "--out", str(tmp_path / "release")))
    # Failures print messages too.
    outputs.append(cli("train", "--preset", "tiny", "--dataset", str(tmp_path / "none.csv"), "--output-dir",
                       str(tmp_path / "y")))
    assert [p.returncode for p in outputs] == [0, 0, 0, 2], [p.stderr[-500:] for p in outputs]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 30 and any(p.suffix == ".safetensors" for p in files)  # the grep had work to do
    assert {p.parent.name for p in files} >= {"run", "adapter", "logs", "metrics", "m2", "release", "checkpoint-4"}
    for path in files:
        assert not leaks(path.read_bytes()), path
    for proc in outputs:
        assert not leaks(proc.stdout + proc.stderr), proc.args


def test_error_messages_and_tracebacks_are_redacted(monkeypatch, capsys):
    for name, token in TOKENS.items():
        monkeypatch.setenv(name, token)
    import datasets

    def echoing_load(*args, **kwargs):  # a library that quotes its request headers in the error
        raise ConnectionError(f"401 for url with headers {{'authorization': 'Bearer {TOKENS['HF_TOKEN']}'}}")

    monkeypatch.setattr(datasets, "load_dataset", echoing_load)
    from fine_tune_llm.data.rows import read_rows

    with pytest.raises(DataError) as err:
        read_rows("someone/private-set")
    assert "Bearer <redacted>" in str(err.value) and not leaks(str(err.value))

    from fine_tune_llm.cli import commands as cli_module

    def crash(args):
        raise RuntimeError(f"token={TOKENS['HUGGING_FACE_HUB_TOKEN']}")

    monkeypatch.setitem(cli_module.COMMANDS, "crash", (lambda p: None, crash))
    assert cli_module.main(["crash"]) == 1
    err_text = capsys.readouterr().err
    assert "Traceback" in err_text and "token=<redacted>" in err_text and not leaks(err_text)
    assert redact("nothing secret here") == "nothing secret here"


def test_no_committed_file_holds_something_shaped_like_a_hub_token():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    pattern = re.compile(rb"hf_[A-Za-z0-9]{30,}")
    for name in tracked.stdout.splitlines():
        path = REPO / name
        if path.is_file() and path.suffix != ".lock":
            # Tests plant fakes on purpose, and say so in the token itself.
            found = [m for m in pattern.findall(path.read_bytes()) if b"fake" not in m.lower()]
            assert not found, name
