"""Crash and resume: complete-or-ignored checkpoints, SIGKILL then resume, Ctrl-C, a diverging loss, a second
training of the same run, a full disk while saving."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_runs import REPO, adapter, env, losses, run, run_args, start, wait_for

from fine_tune_llm.config import make_config
from fine_tune_llm.errors import ConfigError
from fine_tune_llm.run import RunDir
from fine_tune_llm.train import checkpoints
from fine_tune_llm.train.tensorboard_export import read_scalars


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "optimizer.pt").write_bytes(b"o" * 2048)
    checkpoints.write_marker(folder)
    return folder


def test_resume_falls_back_past_incomplete_or_corrupt_checkpoints(tmp_path):
    c2, c4, c6, c8 = (fake_checkpoint(tmp_path, s) for s in (2, 4, 6, 8))
    assert checkpoints.last_good_checkpoint(tmp_path) == c8
    (c8 / checkpoints.MARKER).unlink()                      # killed before the marker was written
    assert checkpoints.last_good_checkpoint(tmp_path) == c6
    with open(c6 / "optimizer.pt", "r+b") as fh:            # killed while writing a file
        fh.truncate(100)
    assert checkpoints.last_good_checkpoint(tmp_path) == c4
    data = bytearray((c4 / "adapter_model.safetensors").read_bytes())
    data[10] ^= 0xFF                                        # same size, different bytes
    (c4 / "adapter_model.safetensors").write_bytes(bytes(data))
    assert checkpoints.problem(c4) == "adapter_model.safetensors does not match its checksum"
    assert checkpoints.resume_point(tmp_path, None) == str(c2)
    (c2 / "optimizer.pt").unlink()
    assert checkpoints.resume_point(tmp_path, None) is None  # nothing trustworthy: start fresh
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint in"):
        checkpoints.resume_point(tmp_path, True)
    with pytest.raises(ConfigError, match="checkpoint-6: cannot resume from it: optimizer.pt has 100 bytes"):
        checkpoints.resume_point(tmp_path, str(c6))
    assert checkpoints.resume_point(tmp_path, False) is None


def test_a_step_saved_again_loses_its_old_marker_first(tmp_path):
    """After a resume, a folder for a step the dead run already reached is stale: its marker must go before the
    Trainer writes over it, or a kill during that overwrite would leave same-size files vouched for."""
    stale = fake_checkpoint(tmp_path, 6)
    from fine_tune_llm.train.trainers import CompletionMarker

    cb = CompletionMarker()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=5, is_world_process_zero=True)
    cb.on_step_end(args, state, None)
    assert checkpoints.is_complete(stale)
    state.global_step = 6
    cb.on_step_end(args, state, None)
    assert not (stale / checkpoints.MARKER).exists()
    cb.on_save(args, state, None)  # the Trainer saved step 6 again: vouched for anew
    assert checkpoints.is_complete(stale)


def test_resuming_with_other_options_is_refused(tmp_path):
    cfg = make_config("tiny", output_dir=str(tmp_path))
    RunDir.of(tmp_path).write_config(cfg)
    fake_checkpoint(tmp_path, 2)
    longer = make_config("tiny", output_dir=str(tmp_path), max_steps=60, save_steps=5)
    assert checkpoints.resume_point(tmp_path, None, longer) == str(tmp_path / "checkpoint-2")
    faster = make_config("tiny", output_dir=str(tmp_path), learning_rate=1e-2, batch_size=4)
    with pytest.raises(ConfigError, match=r"other options \(batch_size: 8 -> 4, learning_rate: 0.003 -> 0.01\)"):
        checkpoints.resume_point(tmp_path, None, faster)
    assert checkpoints.resume_point(tmp_path, False, faster) is None


def test_a_run_saved_before_a_field_existed_resumes_only_with_its_default(tmp_path):
    """config.yaml from before lora_layers existed: that run adapted every block, so lora_layers=1 is a change."""
    import yaml

    cfg = make_config("tiny", output_dir=str(tmp_path))
    run = RunDir.of(tmp_path)
    run.write_config(cfg)
    values = run.read_config_values()
    del values["lora_layers"]
    run.config_file.write_text(yaml.safe_dump(values))
    fake_checkpoint(tmp_path, 2)
    assert checkpoints.resume_point(tmp_path, None, cfg) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"other options \(lora_layers: None -> 1\)"):
        checkpoints.resume_point(tmp_path, None, make_config("tiny", output_dir=str(tmp_path), lora_layers=1))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = start(run_args(tmp_path, "ref"), tmp_path / "ref.log")
    victim = start(run_args(tmp_path, "crash"), tmp_path / "crash.log")
    crash = tmp_path / "crash"
    wait_for(crash / "checkpoint-4" / checkpoints.MARKER, victim)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    # It held the run's lock; killed outright, it left its record but not its lock: the resume below proceeds.
    assert json.loads(RunDir.of(crash).lock_file.read_text())["pid"] == victim.pid
    assert sorted(p.name for p in crash.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # Also die mid-save: checkpoint-4 as a kill inside the Trainer's save leaves it (a file cut short, no marker).
    with open(crash / "checkpoint-4" / "optimizer.pt", "r+b") as fh:
        fh.truncate(1000)
    (crash / "checkpoint-4" / checkpoints.MARKER).unlink()

    assert run(run_args(tmp_path, "crash"), tmp_path / "resume.log") == 0, (tmp_path / "resume.log").read_text()[-3000:]
    log = (tmp_path / "resume.log").read_text()
    assert re.search(r"ignoring checkpoint \S+checkpoint-4: no COMPLETE.json", log)
    assert json.loads((crash / "manifest.json").read_text())["resumed_from"] == str(crash / "checkpoint-2")

    want, got = losses(tmp_path / "ref"), losses(crash)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step}"
    a, b = adapter(tmp_path / "ref" / "adapter"), adapter(crash / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=0, atol=1e-6), name

    # The killed run and the resumed one both logged steps 3-4; the CSV keeps each step once (the newer value).
    events = sorted((crash / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 2
    raw_steps = [ev.step for f in events for ev in _scalars(f, "train/loss")]
    assert len(raw_steps) > len(set(raw_steps))
    rows = (crash / "metrics" / "train_loss_crash.csv").read_text().splitlines()
    assert rows[0] == "Wall time,Step,Value"
    steps = [int(r.split(",")[1]) for r in rows[1:]]
    assert steps == list(range(1, 7))
    values = [float(r.split(",")[2]) for r in rows[1:]]
    assert values == pytest.approx([want[s] for s in steps], abs=1e-6)
    assert [s for _, s, _ in read_scalars(crash / "logs")["train/loss"]] == steps

    # Keep the last K: save_total_limit=2, and both kept checkpoints are complete.
    kept = sorted(crash.glob("checkpoint-*"), key=checkpoints.step_of)
    assert [p.name for p in kept] == ["checkpoint-4", "checkpoint-6"]
    assert all(checkpoints.is_complete(p) for p in kept)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the small config, started in the background once for this module's slow tests."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = start(run_args(tmp, "ref"), tmp / "ref.log")
    yield proc, tmp / "ref"
    if proc.poll() is None:
        proc.kill()


def same_as_reference(run_dir: Path, reference) -> None:
    """The run's logged losses and final adapter are those of the uninterrupted reference run."""
    proc, ref = reference
    assert proc.wait(timeout=600) == 0, (ref.parent / "ref.log").read_text()[-3000:]
    want, got = losses(ref), losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step}"
    a, b = adapter(ref / "adapter"), adapter(run_dir / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_a_second_training_of_a_run_stops_at_once_and_the_first_is_undisturbed(tmp_path, reference):
    """A notebook cell re-run while a terminal job trains, a re-queued cluster job: one writer per run directory."""
    first = start(run_args(tmp_path, "run"), tmp_path / "first.log")
    run_dir = tmp_path / "run"
    wait_for(run_dir / "checkpoint-2" / checkpoints.MARKER, first)  # mid-run, with a checkpoint to resume from
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "fine_tune_llm", "train", *run_args(tmp_path, "run")],
                            capture_output=True, text=True, timeout=300, check=False, env=env(), cwd=REPO)
    assert second.returncode == 2 and time.monotonic() - t0 < 30, second.stderr[-3000:]
    assert second.stderr.startswith(f"error: {run_dir} is in use: training by pid {first.pid} on "
                                    f"{socket.gethostname()}, since "), second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "resuming" not in second.stderr
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert len(list((run_dir / "logs").rglob("events.out.tfevents.*"))) == 1
    assert [h["step"] for h in json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
            if "loss" in h] == list(range(1, 7))
    same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_a_full_disk_while_saving_stops_cleanly_and_a_rerun_resumes_to_the_same_adapter(tmp_path, reference):
    run_dir, full_disk = tmp_path / "run", ("tests.full_disk_train",)
    # 1. The disk fills while checkpoint-6 is written: that folder goes, checkpoint-4 is named.
    assert run(["checkpoint-6/", *run_args(tmp_path, "run")], tmp_path / "1.log", command=full_disk) == 2
    out = (tmp_path / "1.log").read_text()
    assert re.search(rf"error: no space left on the disk holding {run_dir}: saving checkpoint-6 needs at least "
                     rf"[\d.]+ KB, [\d.]+ [KMGT]B free. What was written of checkpoint-6 was removed; the last complete "
                     rf"checkpoint is {run_dir}/checkpoint-4: free some space and run the same command again, it "
                     rf"resumes from there.\n", out), out[-3000:]
    assert "Traceback" not in out
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (run_dir / "adapter").exists()

    # 2. checkpoint-4 is damaged meanwhile (a file cut short): the re-run falls back to checkpoint-2, trains to the
    # end, and the disk fills again while the adapter is saved: no adapter folder, checkpoint-6 named.
    with open(run_dir / "checkpoint-4" / "optimizer.pt", "r+b") as fh:
        fh.truncate(1000)
    assert run([".adapter.partial/", *run_args(tmp_path, "run")], tmp_path / "2.log", command=full_disk) == 2
    out = (tmp_path / "2.log").read_text()
    assert re.search(r"ignoring checkpoint \S+checkpoint-4: optimizer.pt has 1000 bytes, expected \d+", out)
    assert json.loads((run_dir / "manifest.json").read_text())["resumed_from"] == str(run_dir / "checkpoint-2")
    assert re.search(rf"error: no space left on the disk holding {run_dir}: saving the adapter needs at least .*"
                     rf"What was written of the adapter was removed; the last complete checkpoint is "
                     rf"{run_dir}/checkpoint-6: free some space", out), out[-3000:]
    assert not (run_dir / "adapter").exists() and not (run_dir / ".adapter.partial").exists()
    assert checkpoints.is_complete(run_dir / "checkpoint-6")

    # 3. Space freed: the same command resumes from checkpoint-6, trains no further, and saves the adapter.
    assert run(run_args(tmp_path, "run"), tmp_path / "3.log") == 0, (tmp_path / "3.log").read_text()[-3000:]
    assert "trained 6 steps" in (tmp_path / "3.log").read_text()
    same_as_reference(run_dir, reference)


def _scalars(events_file: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_adapter_and_metrics(tmp_path):
    proc = start(run_args(tmp_path, "int", "--max-steps", "40"), tmp_path / "int.log")
    run_dir = tmp_path / "int"
    wait_for(run_dir / "checkpoint-2" / checkpoints.MARKER, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = (tmp_path / "int.log").read_text()
    assert "SIGINT: saving a checkpoint and the adapter after this step" in log
    assert "(interrupted: checkpoint and adapter saved)" in log and "Traceback" not in log
    state = json.loads((run_dir / "trainer_state.json").read_text())
    step = state["global_step"]
    assert 2 < step < 40
    assert checkpoints.is_complete(run_dir / f"checkpoint-{step}")  # saved on Ctrl-C, whatever save_steps says
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "training_config.yaml").is_file()
    rows = (run_dir / "metrics" / "train_loss_int.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[1]) for r in rows] == list(range(1, step + 1))
    assert (run_dir / "imgs" / "loss_int.png").is_file()


@pytest.mark.slow
def test_diverging_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e6 only flattens this model (RMSNorm: loss sits at ln(vocab), finite); 1e20 overflows bf16 at step 2."""
    log = tmp_path / "nan.log"
    rc = run(run_args(tmp_path, "nan", "--learning-rate", "1e20", "--save-steps", "1"), log)
    out = log.read_text()
    assert rc == 2, out[-3000:]
    m = re.search(r"error: loss became (nan|inf|-inf) at step (\d+); training stopped before that step's update. "
                  r"Last good checkpoint: (\S+)\. Lower --learning-rate", out)
    assert m, out[-3000:]
    assert "Traceback" not in out
    step, good = int(m.group(2)), Path(m.group(3))
    run_dir = tmp_path / "nan"
    assert good == run_dir / f"checkpoint-{step - 1}"
    assert checkpoints.is_complete(good)
    assert checkpoints.step_of(RunDir.of(run_dir).checkpoints()[0]) == step - 1  # nothing later
    assert all(torch.isfinite(t).all() for t in adapter(good).values())
    assert math.isfinite(json.loads((good / "trainer_state.json").read_text())["log_history"][-1]["loss"])
