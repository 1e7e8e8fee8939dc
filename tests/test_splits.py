"""Saved splits: training writes them once; every later stage reads them, and a changed data file is caught."""

import json
import shutil

import pytest

from fine_tune_llm.data import rows as data
from fine_tune_llm.errors import DataError
from fine_tune_llm.eval.evaluate import eval_rows
from fine_tune_llm.run import RunDir
from tests.conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained on a copy of the sample data (so a test may edit the file)."""
    root = tmp_path_factory.mktemp("splits")
    copy = root / "psychology.jsonl"
    shutil.copyfile(data.SAMPLE_DATA, copy)
    cfg, result = train_tiny(root, dataset=str(copy), max_steps=2, eval_steps=2, save_steps=2)
    return cfg, result.run, copy


def test_training_saves_each_split_with_row_ids_and_hashes(trained):
    cfg, run, _ = trained
    record = json.loads(run.splits_file.read_text())
    made = data.load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction)
    for name, rows in made.items():
        saved = record["splits"][name]
        assert saved["rows"] == [r["row"] for r in rows] and saved["count"] == len(rows)
        assert len(saved["row_sha256"]) == len(rows) and len(saved["sha256"]) == 64
    assert run.load_splits() == made


def test_changing_the_split_function_does_not_change_an_old_runs_test_rows(trained, monkeypatch):
    cfg, run, _ = trained
    before = [r["row"] for r in eval_rows(run, "test")]

    def another_split(examples, val_fraction, test_fraction, **_):  # e.g. a later version that splits differently
        return {"train": examples[:100], "validation": examples[100:120], "test": examples[120:]}

    monkeypatch.setattr(data, "split_by_question", another_split)
    rebuilt = data.load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction)
    assert [r["row"] for r in rebuilt["test"]] != before  # re-splitting now would change the held-out rows...
    assert [r["row"] for r in eval_rows(run, "test")] == before  # ...the run's saved split does not


def test_editing_one_row_of_the_data_file_is_detected(trained, tmp_path):
    _cfg, run, copy = trained
    test_row = run.load_splits()["test"][0]["row"]
    lines = copy.read_text().splitlines()
    row = json.loads(lines[test_row - 1])
    row["response_j"] += " (edited)"
    lines[test_row - 1] = json.dumps(row)
    original = copy.read_text()
    try:
        copy.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError) as err:
            eval_rows(run, "test")
        message = str(err.value)
        assert str(copy) in message and "1 row(s) differ" in message and "1 of" in message and "test" in message
    finally:
        copy.write_text(original)
    assert eval_rows(RunDir.of(run.path), "test")  # restored: readable again
