"""A full disk is one message naming the path, the space needed and free, and what to do; nothing half-written stays.

The run itself (a checkpoint save failing with ENOSPC, then a re-run resuming to the same adapter) is in
test_resume.py; these are the pieces, each with a writer made to fail as a full disk does.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fine_tune_llm import files
from fine_tune_llm.errors import DiskFull
from fine_tune_llm.train import checkpoints


def enospc(path="x") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"a" * 3000)
    (folder / "optimizer.pt").write_bytes(b"o" * 6000)
    checkpoints.write_marker(folder)
    return folder


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    assert files.is_disk_full(enospc())
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    safetensors_style = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                     '"No space left on device" })')
    assert files.is_disk_full(safetensors_style)
    try:
        try:
            raise enospc()
        except OSError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert files.is_disk_full(outer)
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # torch.save reports no errno: a failed write counts as a full disk only when the disk is nearly full
    torch_style = RuntimeError("basic_ios::clear: iostream error")
    assert not files.is_disk_full(torch_style, tmp_path)
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    assert files.is_disk_full(torch_style, tmp_path)
    assert not files.is_disk_full(RuntimeError("CUDA error: device-side assert"), tmp_path)


def test_an_atomic_write_that_runs_out_of_space_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def full(fd):
        raise enospc(path)

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(DiskFull) as err:
        files.write_atomic(path, "new" * 1000)
    assert re.fullmatch(rf"no space left on the disk holding {tmp_path}: writing report.json needs at least 3.00 KB, "
                        r"\S+ \w?B free. Free some space and run the same command again.", str(err.value))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_write_that_cannot_fit_is_refused_before_any_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda path: 100)
    with pytest.raises(DiskFull, match=r"writing report.json needs at least 3.00 KB, 100 B free"):
        files.write_atomic(tmp_path / "report.json", "x" * 3000)
    assert not list(tmp_path.iterdir())


def agree_alone(ok: bool) -> bool:
    return ok


def test_a_checkpoint_save_that_runs_out_of_space_is_removed_and_names_the_last_good_one(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    folder = tmp_path / "checkpoint-4"

    def save():  # the Trainer got the adapter out, then the optimizer state hit the full disk
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"a" * 3000)
        (folder / "optimizer.pt").write_bytes(b"o" * 10)
        raise enospc(folder / "optimizer.pt")

    with pytest.raises(DiskFull) as err:
        checkpoints.save_or_stop(save, folder, 9000, agree_alone, True, "checkpoint-4")
    assert re.fullmatch(rf"no space left on the disk holding {tmp_path}: saving checkpoint-4 needs at least 9.00 KB, "
                        rf"\S+ \w?B free. What was written of checkpoint-4 was removed; the last complete checkpoint is "
                        rf"{good}: free some space and run the same command again, it resumes from there.",
                        str(err.value))
    assert not folder.exists() and checkpoints.is_complete(good)


def test_a_checkpoint_that_cannot_fit_is_refused_before_the_save_starts(tmp_path, monkeypatch):
    good = fake_checkpoint(tmp_path, 2)
    assert checkpoints.expected_bytes(checkpoints.RunDir.of(tmp_path), None) == sum(
        p.stat().st_size for p in good.iterdir() if p.name != checkpoints.MARKER)
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 5000)
    started = []
    with pytest.raises(DiskFull, match=r"saving checkpoint-4 needs at least 9.00 KB, 5.00 KB free. Nothing of "
                                       r"checkpoint-4 was written; the last complete checkpoint is \S+checkpoint-2"):
        checkpoints.save_or_stop(lambda: started.append(1), tmp_path / "checkpoint-4", 9000, agree_alone, True,
                                 "checkpoint-4")
    assert not started


def test_every_rank_stops_when_one_runs_out_of_space(tmp_path):
    """Under DDP the ranks decide together: a rank whose own save went well stops too, instead of waiting
    forever in the next all-reduce for the one that stopped."""
    other_rank_failed = [True, False]  # the free-space check passed everywhere; the save failed elsewhere

    def agree(ok: bool) -> bool:
        return ok and other_rank_failed.pop(0)

    folder = tmp_path / "checkpoint-2"
    with pytest.raises(DiskFull, match="What was written of checkpoint-2 was removed; no checkpoint is complete yet"):
        checkpoints.save_or_stop(lambda: folder.mkdir(), folder, 0, agree, True, "checkpoint-2")
    assert not folder.exists()


def test_the_completion_marker_on_a_full_disk_removes_its_checkpoint(tmp_path, monkeypatch):
    from fine_tune_llm.train.trainers import CompletionMarker

    folder = fake_checkpoint(tmp_path, 4)
    (folder / checkpoints.MARKER).unlink()

    def full(folder):
        raise enospc(folder)

    monkeypatch.setattr(checkpoints, "write_marker", full)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=4, is_world_process_zero=True)
    with pytest.raises(DiskFull, match="What was written of checkpoint-4 was removed"):
        CompletionMarker().on_save(args, state, None)
    assert not folder.exists()


def test_a_release_folder_that_runs_out_of_space_leaves_no_partial_folder(tmp_path):
    from fine_tune_llm.release.common import staged

    final = tmp_path / "release" / "merged"
    final.mkdir(parents=True)
    (final / "old.txt").write_text("the previous release")
    message = rf"disk holding {final.parent}: writing {final} did not fit, .* free. The partial folder was removed."
    with pytest.raises(DiskFull, match=message), staged(final, overwrite=True) as out:
        (out / "model.safetensors").write_bytes(b"w" * 100)
        raise enospc(out / "model.safetensors")
    assert sorted(p.name for p in final.parent.iterdir()) == ["merged"]
    assert (final / "old.txt").read_text() == "the previous release"


def test_runs_csv_append_that_runs_out_of_space_is_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "runs.csv"
    path.write_text("a,b\n1,2")  # and a writer died before its newline
    real_write = os.write

    def full(fd, data):  # half the row gets out, then the disk is full
        real_write(fd, data[: len(data) // 2])
        raise enospc(path)

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(DiskFull, match=r"adding a row to runs.csv"), files.locked_append(path) as (header, rows):
        assert header == "a,b"
        rows.write("3,4\n")
    assert path.read_text() == "a,b\n1,2"
