"""Standard benchmarks through lm-evaluation-harness: --tasks parsing, the message without the optional group, the
before/after table and its flags on hand-made results, and the tiny model run offline through lm-eval on a task
built from the sample's (question, chosen, rejected) rows, cross-checked pair by pair against our own scorer."""

from __future__ import annotations

import csv
import json
import math
import socket
import sys
from pathlib import Path

import pytest
import yaml

from fine_tune_llm.errors import ConfigError, EnvironmentNotReady
from fine_tune_llm.eval import harness, harness_report, scoring
from tests.conftest import GEMMA_TOKENIZER, need, train_tiny

# --- without the optional group ---------------------------------------------------------------------------------


def test_without_the_eval_group_one_message_names_the_install_command(monkeypatch, tmp_path, capsys):
    from fine_tune_llm.cli import main
    from fine_tune_llm.eval import evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if not installed

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing harness was reported")

    monkeypatch.setattr(evaluate, "load_columns", no_model)
    monkeypatch.setattr(evaluate, "load_tokenizer", no_model)
    # The run directory does not even exist: the harness check comes before the run is read.
    assert main(["evaluate", str(tmp_path / "no-such-run"), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "`make install-eval`" in err and "lm-evaluation-harness" in err and "--tasks" in err
    with pytest.raises(EnvironmentNotReady, match="make install-eval"):
        harness.require_lm_eval()


# --- what --tasks accepts ---------------------------------------------------------------------------------------


def test_tasks_are_names_task_files_or_a_yaml_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.yaml"
    config.write_text("task: mine\ndataset_path: json\nprocess_docs: !function utils.process\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.yaml").write_text("task: other\ndataset_path: json\n")
    listed = tmp_path / "suite.yaml"
    listed.write_text("tasks:\n  - arc_easy\n  - sub/other.yaml\n  - mmlu_high_school_psychology\n")
    (tmp_path / "plain.yml").write_text("- hellaswag\n- arc_easy\n")

    assert harness.parse_tasks(" arc_easy, mmlu_high_school_psychology ,,") == [
        "arc_easy", "mmlu_high_school_psychology"]
    # A task config (even with lm-eval's own !function tag) is handed to lm-eval as a path.
    assert harness.parse_tasks("mine.yaml,heldout_pairs") == [str(config), "heldout_pairs"]
    # A list expands, its relative paths resolved against the list's folder; repeats are dropped.
    assert harness.parse_tasks(f"{listed},plain.yml") == [
        "arc_easy", str(tmp_path / "sub" / "other.yaml"), "mmlu_high_school_psychology", "hellaswag"]

    with pytest.raises(ConfigError, match="--tasks is empty"):
        harness.parse_tasks(" , ")
    with pytest.raises(ConfigError, match="no such file .*missing.yaml"):
        harness.parse_tasks("missing.yaml")
    (tmp_path / "bad.yaml").write_text("answer: 42\n")
    with pytest.raises(ConfigError, match="bad.yaml is neither an lm-eval task config"):
        harness.parse_tasks("bad.yaml")


# --- the table, on hand-made lm-eval results -------------------------------------------------------------------


def _results(acc: dict[str, list[float]], ppl: dict[str, float], group_acc: float) -> dict:
    """lm-eval's results dict for: task `t` (acc per item), a group `g` over it, and a task `lm` (lower is better)."""
    n = len(acc["t"])
    mean = sum(acc["t"]) / n
    se = math.sqrt(sum((a - mean) ** 2 for a in acc["t"]) / (n - 1) / n)
    return {
        "results": {"g": {"acc,none": group_acc, "acc_stderr,none": 0.01, "alias": "g"},
                    "t": {"acc,none": mean, "acc_stderr,none": se, "alias": " - t", "sample_len": n},
                    "lm": {"word_perplexity,none": ppl["lm"], "word_perplexity_stderr,none": "N/A"}},
        "group_subtasks": {"g": ["t"]},
        "higher_is_better": {"g": {"acc": True}, "t": {"acc": True}, "lm": {"word_perplexity": False}},
        "n-samples": {"t": {"original": n, "effective": n}, "lm": {"original": 5, "effective": 5}},
        "samples": {"t": [{"doc_id": i, "filter": "none", "acc": a} for i, a in enumerate(acc["t"])]},
    }


def test_changes_carry_a_paired_standard_error_and_drops_beyond_two_of_them_are_flagged():
    base = [1.0] * 16 + [0.0] * 4  # 20 items, 16 right
    tuned = [1.0] * 12 + [0.0] * 8  # the same items, 4 of the right ones now wrong
    raw = {"base": {"results": _results({"t": base}, {"lm": 10.0}, 0.80), "seconds": 3.0},
           "tuned": {"results": _results({"t": tuned}, {"lm": 12.0}, 0.79), "seconds": 4.0}}
    h = harness_report.summarize(raw, limit=None, lm_eval_version="0.4.13")
    rows = {(r["task"], r["metric"]): r for r in h["rows"]}
    t = rows["t", "acc"]
    assert t["values"] == {"base": 0.8, "tuned": 0.6} and t["n"] == 20 and not t["top"]
    # Per-item differences: four -1s and sixteen 0s. SE of their mean by hand: sd / sqrt(n).
    d_mean = -4 / 20
    d_sd = math.sqrt((4 * (-1 - d_mean) ** 2 + 16 * d_mean ** 2) / 19)
    change = t["changes"]["tuned"]
    assert change["change"] == pytest.approx(-0.2) and change["paired"]
    assert change["stderr"] == pytest.approx(d_sd / math.sqrt(20))  # 0.0918: the drop is 2.18 of them
    assert change["flagged"]
    # Unpaired, the same drop would hide inside the noise: sqrt(se_b^2 + se_t^2) = 0.145.
    unpaired = math.hypot(t["stderr"]["base"], t["stderr"]["tuned"])
    assert abs(change["change"]) < 2 * unpaired
    # A group has no per-item values here: its change gets the harness's errors combined, and -0.01 is no drop.
    g = rows["g", "acc"]["changes"]["tuned"]
    assert g["stderr"] == pytest.approx(math.hypot(0.01, 0.01)) and not g["paired"] and not g["flagged"]
    assert rows["g", "acc"]["top"]
    # Lower is better: a rise is the worse direction, but without a standard error nothing is flagged.
    lm = rows["lm", "word_perplexity"]["changes"]["tuned"]
    assert lm["change"] == pytest.approx(2.0) and lm["stderr"] is None and not lm["flagged"]
    assert harness_report.is_drop(2.0, 0.5, higher_is_better=False)
    assert not harness_report.is_drop(-2.0, 0.5, higher_is_better=False)
    assert not harness_report.is_drop(-1.0, 0.5, higher_is_better=True)  # exactly 2 SE: not larger
    assert harness_report.is_drop(-1.01, 0.5, higher_is_better=True)

    report = {"columns": {"base": "base", "tuned": "SFT"}, "harness": h, "created": "now", "run": "r",
              "settings": {"split": "test"}, "git": {"commit": "abc"}}
    md = "\n".join(harness_report.markdown(report))
    assert "| g | acc | n/a | 0.8000 ± 0.0100 | 0.7900 ± 0.0100 | -0.0100 ± 0.0141 (u) |" in md
    assert "| lm | word_perplexity | 5 | 10.0000 | 12.0000 | +2.0000 |" in md
    assert "| t |" not in md and "1 more rows (the groups' subtasks)" in md  # subtasks: json and csv only
    assert harness_report.drops(report) == "t/acc SFT -0.2000"
    rows_csv = harness_report.csv_rows(report)
    assert len(rows_csv) == 3 * 2 and {r["column"] for r in rows_csv} == {"base", "tuned"}
    flagged = [r for r in rows_csv if r["flagged"]]
    assert [(r["task"], r["column"]) for r in flagged] == [("t", "tuned")]


def test_paired_error_needs_the_same_items():
    assert harness_report.paired_stderr({0: 1.0, 1: 0.0, 2: 1.0}, {0: 1.0, 1: 0.0}) is None
    assert harness_report.paired_stderr({0: 1.0}, {0: 0.0}) is None
    assert harness_report.paired_stderr({0: 1.0, 1: 0.0}, {0: 1.0, 1: 0.0}) == 0.0


# --- the tokens lm-eval scores are ours, plus the prompt's last newline ------------------------------------------


def test_lm_eval_splits_gemma_prompts_and_answers_into_our_tokens():
    """With gemma-2b-it's real tokenizer: lm-eval tokenizes context + choice together and moves the context's
    trailing newline into the choice; the result is our prompt and answer tokens, the newline scored as well."""
    from transformers import AutoTokenizer

    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.chat_template import build_messages, encode_batch
    from fine_tune_llm.data.rows import load_splits

    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from fine_tune_llm.model.loading import load_model

    gemma = AutoTokenizer.from_pretrained(need(GEMMA_TOKENIZER))
    cfg = make_config("tiny")
    rows = load_splits("sample", cfg.seed)["test"]
    items, left_out = harness.pair_items(gemma, cfg, rows)
    assert left_out == 0 and len(items) == len(rows) == 16
    lm = HFLM(pretrained=load_model(cfg, quantize=False), tokenizer=gemma, batch_size=1)
    newline = gemma.convert_tokens_to_ids("\n")
    for item, row in zip(items, rows):
        assert item["context"].startswith("<bos><start_of_turn>user\n") and item["context"].endswith("model\n")
        ours = encode_batch(gemma, [build_messages(row["question"])], [row["answer"]], 512)
        ctx, cont = lm._encode_pair(item["context"], item["choices"][0])
        assert ctx + cont == ours["input_ids"][0]  # one <bos>, the same pieces
        answer = [t for t, m in zip(ours["input_ids"][0], ours["completion_mask"][0]) if m]
        assert cont == [newline] + answer and answer[-1] == gemma.convert_tokens_to_ids("<end_of_turn>")


# --- the tiny model through lm-eval, offline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("lm_eval")
    cfg, _ = train_tiny(tmp_path_factory.mktemp("harness"), "runs/tiny-harness", max_steps=8, logging_steps=4,
                        eval_steps=8, save_steps=8)
    return cfg


@pytest.fixture
def offline(monkeypatch):
    """No network at all: every socket connection fails."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_lm_eval_preference_accuracy_agrees_with_ours_pair_by_pair(run, offline):
    """The sample's held-out (question, chosen, rejected) rows as a local lm-eval task, base and tuned: the harness's
    summed log-likelihood margin of every pair equals ours (float32 sums: within 1e-3 nats, relative 1e-5), so its
    acc equals our raw-sum accuracy."""
    from fine_tune_llm.eval.evaluate import eval_rows, load_columns
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.run import RunDir

    runs = RunDir.of(run.output_dir)
    cfg = runs.read_config()
    tokenizer = load_tokenizer(cfg)
    rows = eval_rows(runs, "test")
    plan = harness.plan(runs, cfg, tokenizer, rows, "heldout_pairs")
    task = yaml.safe_load(Path(plan.specs[0]).read_text())
    assert task["dataset_path"] == "json" and task["output_type"] == "multiple_choice"
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.parent == runs.harness_dir and plan.pairs == {"file": plan.specs[0], "split": "test", "pairs": 16,
                                                              "left_out": 0}
    assert [json.loads(line)["row"] for line in data.read_text().splitlines()] == [r["row"] for r in rows]

    columns = load_columns(runs, cfg)
    raw = harness.run_harness(plan, columns, cfg, batch_size=4)
    q = [r["question"] for r in rows]
    for name in columns.names:
        samples = sorted(raw[name]["results"]["samples"]["heldout_pairs"], key=lambda s: s["doc_id"])
        lls = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
        with columns.use(name) as model:
            chosen = scoring.score_answers(model, tokenizer, q, [r["answer"] for r in rows], cfg.max_length,
                                           progress=False)
            rejected = scoring.score_answers(model, tokenizer, q, [r["rejected"] for r in rows], cfg.max_length,
                                             progress=False)
        ours = [k - j for j, k in zip(chosen.nats, rejected.nats)]  # log-lik chosen - rejected
        theirs = [a - b for a, b in lls]
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-3)
        assert min(abs(m) for m in ours) > 1e-2  # no pair within the tolerance of a tie: the signs must agree
        # Each answer's log-lik differs from ours by the same amount for both answers of a pair: the prompt's
        # newline, which lm-eval scores as part of every choice.
        newline = [a + j for (a, _), j in zip(lls, chosen.nats)]
        assert [b + k for (_, b), k in zip(lls, rejected.nats)] == pytest.approx(newline, abs=1e-3)
        assert all(-20 < x < 0 for x in newline)
        acc = raw[name]["results"]["results"]["heldout_pairs"]["acc,none"]
        mine = scoring.preference_metrics((chosen.nats, chosen.tokens), (rejected.nats, rejected.tokens))
        assert acc == mine["accuracy_sum"] == sum(m > 0 for m in ours) / len(ours)


def test_evaluate_with_tasks_adds_the_table_to_report_runs_csv_and_harness_csv(run, offline, tmp_path, capsys):
    from fine_tune_llm.cli import main

    run_dir = Path(run.output_dir)
    assert main(["evaluate", str(run_dir), "--tasks", "heldout_pairs", "--limit", "10", "--n-generations", "0",
                 "--metrics-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "heldout_pairs/acc" in out
    report = json.loads((run_dir / "report.json").read_text())
    h = report["harness"]
    assert h["limit"] == 10 and h["columns"] == ["base", "tuned"] and h["lm_eval"]
    (row,) = h["rows"]
    assert row["task"] == "heldout_pairs" and row["metric"] == "acc" and row["n"] == 10 and row["top"]
    assert set(row["values"]) == {"base", "tuned"} and set(row["changes"]) == {"tuned"}
    assert row["changes"]["tuned"]["paired"]
    md = (run_dir / "report.md").read_text()
    assert "## Standard benchmarks (lm-evaluation-harness)" in md and "| heldout_pairs | acc | 10 |" in md
    assert "first 10 items of each task" in md and "harness: 10 pairs, ours: 16" in md
    with open(tmp_path / "runs.csv", newline="") as fh:
        (runs_row,) = list(csv.DictReader(fh))
    assert runs_row["harness_drops"] in ("none", f"heldout_pairs/acc SFT {row['changes']['tuned']['change']:+.4f}")
    assert runs_row["harness_drops"] == harness_report.drops(report)
    with open(tmp_path / "harness.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["task"], r["column"]) for r in table] == [("heldout_pairs", "base"), ("heldout_pairs", "tuned")]
    assert float(table[1]["value"]) == row["values"]["tuned"] and table[0]["limit"] == "10"

    # The model card carries the same table under its evaluation section; a malformed one is left out.
    from fine_tune_llm.release.common import locate_run
    from fine_tune_llm.release.modelcard import benchmark_lines, evaluation_section

    card = evaluation_section(locate_run(run_dir))
    assert "### Standard benchmarks (lm-evaluation-harness)" in card and "| heldout_pairs | acc | 10 |" in card
    assert benchmark_lines({"harness": {"columns": ["base"], "rows": [{"top": True}]}}) == []


def test_unknown_task_or_unloadable_data_is_named_before_the_model_loads(run, offline, monkeypatch, capsys,
                                                                          tmp_path):
    from fine_tune_llm.cli import main
    from fine_tune_llm.eval import evaluate

    monkeypatch.setattr(evaluate, "load_columns", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["evaluate", run.output_dir, "--tasks", "heldout_pairs,no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_task_xyz' is not an lm-eval task" in err and "Traceback" not in err
    # A task whose data lm-eval cannot load (here a missing local file; offline, a Hub dataset not yet cached).
    config = harness.task_config("lost", tmp_path / "gone.jsonl")
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", run.output_dir, "--tasks", str(tmp_path / "lost.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"lm-eval could not load the data of '{tmp_path / 'lost.yaml'}'" in err and len(err.splitlines()) == 1
