"""One writer per run directory (run_lock.py), and files several runs share (metrics/runs.csv) appended whole."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import REPO, env

from fine_tune_llm.cli import main
from fine_tune_llm.config import make_config
from fine_tune_llm.errors import RunInUse
from fine_tune_llm.run import RunDir
from fine_tune_llm.run_lock import hold

HOLDER = """
import sys, time
from fine_tune_llm.run_lock import hold
with hold(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock (as a training would), once it says so."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, cwd=REPO, env=env())
    assert proc.stdout.readline().strip() == b"held"
    return proc


@pytest.fixture
def holder(tmp_path):
    proc = start_holder(tmp_path / "run")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, holder):
    run = RunDir.of(tmp_path / "run")
    record = json.loads(run.lock_file.read_text())
    assert (record["pid"], record["host"], record["what"]) == (holder.pid, socket.gethostname(), "training")
    with pytest.raises(RunInUse) as err, hold(run, "evaluation"):
        raise AssertionError("the lock was granted twice")
    message = str(err.value)
    assert message.startswith(f"{run.path} is in use: training by pid {holder.pid} on {socket.gethostname()}, since ")
    assert "command: python -c " in message
    assert record["since"] in message and "wait for it to finish or stop it" in message

    holder.send_signal(signal.SIGKILL)  # no clean-up at all: the OS drops its lock with the process
    holder.wait()
    assert json.loads(run.lock_file.read_text())["pid"] == holder.pid  # its record is left behind, stale
    with hold(run, "evaluation"):
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    assert run.lock_file.read_text() == ""  # emptied on release


def test_the_lock_is_reentrant_within_a_process_and_other_ranks_take_none(tmp_path, monkeypatch):
    run = RunDir.of(tmp_path / "run")
    with hold(run, "demo"), hold(run, "training"):  # the demo trains, then evaluates, under one hold
        assert json.loads(run.lock_file.read_text())["what"] == "demo"
        (run.path / "config.yaml").write_text("{}\n")
    assert run.lock_file.read_text() == ""
    fresh = RunDir.of(tmp_path / "fresh")
    with hold(fresh, "training"):  # a start that stops before writing anything (bad data, say) ...
        assert fresh.lock_file.is_file()
    assert not fresh.path.exists()  # ... leaves no directory behind
    monkeypatch.setenv("RANK", "1")  # under a launcher, rank 0 holds the lock for the job
    with hold(tmp_path / "rank1", "training"):
        assert not (tmp_path / "rank1").exists()


def test_train_and_evaluate_of_a_run_in_use_stop_at_once_and_write_nothing(tmp_path, holder, capsys):
    run = RunDir.of(tmp_path / "run")
    t0 = time.monotonic()
    assert main(["train", "--preset", "tiny", "--output-dir", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run.path} is in use: training by pid {holder.pid}") and "Traceback" not in err
    assert sorted(p.name for p in run.path.iterdir()) == [".lock"]
    run.write_config(make_config("tiny", output_dir=str(run.path)))  # as if its training had begun
    assert main(["evaluate", str(run.path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run.path} is in use: training by pid {holder.pid}")
    assert time.monotonic() - t0 < 30  # no model was loaded
    assert not run.report_json.exists()


def test_a_release_of_a_run_in_use_stops_before_writing(tmp_path, holder):
    from safetensors.torch import save_file
    from torch import zeros

    from fine_tune_llm.release import release_adapter

    run = RunDir.of(tmp_path / "run")
    run.write_config(make_config("tiny", output_dir=str(run.path)))
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"q.lora_A.weight": zeros(2, 2)}, str(run.adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(RunInUse, match=f"in use: training by pid {holder.pid}"):
        release_adapter(run.path)
    assert not (run.path / "release").exists()


# --- metrics/runs.csv: one file, many runs ---------------------------------------------------------------------

APPENDER = """
import os, sys, time
from fine_tune_llm.eval.report import append_runs_csv
path, who, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):  # start together: both find no file, both would write its header
    time.sleep(0.001)
for i in range(n):
    base = {"answers": i, "pairs": 0, "perplexity": 1.5}
    append_runs_csv(path, {"created": f"{who}-{i}", "run": who, "run_dir": who * 12000, "base_model": "m",
                           "config": {}, "global_step": i, "settings": {"split": "test"}, "hit_max_tokens": {},
                           "metrics": {"base": base, "tuned": base}, "git": {}, "wall_seconds": 1.0})
"""


def test_two_processes_appending_to_runs_csv_leave_only_whole_rows(tmp_path):
    """Rows longer than a write buffer (12 kB): without the lock, two appenders' writes interleave mid-row."""
    path, n, go = tmp_path / "metrics" / "runs.csv", 300, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), who, str(n), str(go)], cwd=REPO, env=env())
             for who in ("a", "b")]
    time.sleep(3)  # both imported and waiting
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * n
    assert sorted(r["created"] for r in rows) == sorted(f"{w}-{i}" for w in "ab" for i in range(n))
    assert all(r["run_dir"] == r["run"] * 12000 and r["base_perplexity"] == "1.5" for r in rows)
    assert path.read_text().count("\n") == 2 * n + 1  # one header


SLOW_WRITER = """
import sys, time
from fine_tune_llm.files import locked_append
with locked_append(sys.argv[1]) as (header, rows), open(sys.argv[1], "a") as raw:
    raw.write("slow,half")  # a row written in pieces, directly: a slow disk, a network filesystem
    raw.flush()
    print("writing", flush=True)
    time.sleep(2)
    raw.write(" and the rest\\n")
"""


def test_an_append_waits_for_one_in_progress(tmp_path):
    """A writer whose row takes several writes (a slow disk, a network filesystem) is not cut into."""
    from fine_tune_llm.files import locked_append

    path = tmp_path / "shared.csv"
    path.write_text("who,what\n")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], stdout=subprocess.PIPE, cwd=REPO,
                            env=env())
    assert proc.stdout.readline().strip() == b"writing"
    with locked_append(path) as (header, rows):
        assert header == "who,what"
        rows.write("fast,row\n")
    assert proc.wait(timeout=60) == 0
    assert path.read_text().splitlines() == ["who,what", "slow,half and the rest", "fast,row"]


def test_a_row_left_without_its_newline_is_closed_before_the_next(tmp_path):
    from fine_tune_llm.files import locked_append

    path = tmp_path / "shared.csv"
    path.write_text("who,what\nearlier,row cut")  # a writer died mid-row
    with locked_append(path) as (_, rows):
        rows.write("next,row\n")
    assert path.read_text() == "who,what\nearlier,row cut\nnext,row\n"
