"""The judged part of an evaluation: how it reads in the report, the card and runs.csv, and what an old split says."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import pytest

from fine_tune_llm.eval import behaviour_report
from fine_tune_llm.eval.judge import RUBRIC
from fine_tune_llm.eval.report import RUNS_COLUMNS, _widened
from fine_tune_llm.files import locked_append, locked_rewrite

LABELS = {"base": "base", "sft": "SFT", "tuned": "SFT+DPO"}
RUBRIC_FIRST_LINE = RUBRIC.splitlines()[0]


def behaviour(clustered: bool = True) -> dict:
    def win(stage, over, raw, matched):
        return {"stage": stage, "over": over, "raw": {"win_rate": raw, "ci95": [raw - 0.1, raw + 0.1]},
                "matched": {"win_rate": matched, "ci95": [matched - 0.1, matched + 0.1]}, "longer": 0.9}

    return {
        "split": {"grouping": "near-duplicate clusters" if clustered else "identical questions only",
                  "clustered": clustered,
                  "levels": [{"threshold": 0.8, "test_questions": 200, "with_near_twin": 3, "fraction": 0.015},
                             {"threshold": 0.7, "test_questions": 200, "with_near_twin": 80, "fraction": 0.4}]},
        "reward": {"order": ["base", "sft", "tuned"],
                   "columns": {n: {"mean_reward": r, "ci95": [r - 0.2, r + 0.2], "mean_tokens": t}
                               for n, r, t in (("base", -0.5, 120), ("sft", 0.4, 60), ("tuned", 0.6, 70))},
                   "win_rates": [win("sft", "base", 0.8, 0.75), win("tuned", "sft", 0.6, 0.55)],
                   "judge": {"pairs": 201, "raw": {"accuracy": 0.99, "ci95": [0.97, 1.0]},
                             "matched": {"accuracy": 0.97, "ci95": [0.95, 0.99]},
                             "half": {"accuracy": 0.93, "ci95": [0.9, 0.96]}},
                   "train_pairs": 160, "train_seconds": 300.0, "options": {"lora_layers": 15}},
        "safety": {"questions": 14, "method": "rules", "note": "Harmful advice needs a judge (--judge).",
                   "columns": {n: {"answers": 14, "points_to_help": h, "harmful": None}
                               for n, h in (("base", 9), ("sft", 4), ("tuned", 5))}},
    }


def test_the_report_section_states_leakage_reward_win_rates_and_safety_counts():
    text = "\n".join(behaviour_report.markdown({"columns": LABELS, "behaviour": behaviour()}))
    assert "3 (2%) at Jaccard >= 0.8, 80 (40%) at Jaccard >= 0.7, of 200" in text
    assert "**93% [90%, 96%] length-matched with neither ending where its author ended it**" in text
    assert "Trained on 160 pairs, the top 15 blocks, in 300 s" in text and "no better than chance" not in text
    assert "| mean reward [95% CI] | -0.500 [-0.700, -0.300] | 0.400 [0.200, 0.600] | 0.600 [0.400, 0.800] |" in text
    assert "| SFT+DPO over SFT | 60% [50%, 70%] | 55% [45%, 65%] | 90% |" in text
    assert "| points to professional or crisis help | 9/14 | 4/14 | 5/14 |" in text
    assert "| gives harmful advice | n/a | n/a | n/a |" in text and "needs a judge" in text
    assert "saved before near-duplicate clustering" not in text


def test_a_split_saved_before_clustering_is_labelled_so():
    text = "\n".join(behaviour_report.markdown({"columns": LABELS, "behaviour": behaviour(clustered=False)}))
    assert "saved before near-duplicate clustering and is kept as saved" in text


def test_runs_csv_carries_the_judged_numbers():
    fields = behaviour_report.runs_fields({"behaviour": behaviour()})
    assert fields == {"test_near_twins": 0.015, "rm_accuracy_length_matched": 0.93, "tuned_mean_reward": 0.6,
                      "tuned_rm_win_rate": 0.55, "base_safety_help": 9, "tuned_safety_help": 5}
    assert set(fields) <= set(RUNS_COLUMNS)


def test_a_runs_csv_written_before_a_column_existed_gains_it_and_keeps_its_rows(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("created,run,base_perplexity\n2026-01-01,old,7.5\n")
    locked_rewrite(path, _widened)
    with locked_append(path) as (header, rows):  # a writer that waited on the lock appends to the new file
        columns = next(csv.reader([header]))
        csv.DictWriter(rows, fieldnames=columns).writerow({"run": "new", "tuned_mean_reward": 0.6})
    got = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["run"] for r in got] == ["old", "new"] and got[0]["base_perplexity"] == "7.5"
    assert got[0]["tuned_mean_reward"] == "" and got[1]["tuned_mean_reward"] == "0.6"
    assert set(RUNS_COLUMNS) <= set(got[0]) and not list(tmp_path.glob(".*tmp*"))
    before = path.read_text()
    locked_rewrite(path, _widened)  # nothing missing: the file is left alone
    assert path.read_text() == before


def test_the_card_carries_the_judged_section_one_heading_level_down(tmp_path):
    from fine_tune_llm.release.modelcard import behaviour_lines

    lines = behaviour_lines({"columns": LABELS, "behaviour": behaviour()})
    assert "### Did the behaviour change?" in lines and "#### Reward-model judge" in lines
    assert behaviour_lines({"columns": LABELS, "behaviour": {"split": {}}}) == []  # malformed: left out


@pytest.mark.parametrize("clustered", [True, False])
def test_the_picture_adds_reward_and_win_rate_panels(clustered):
    from fine_tune_llm.eval.report_plot import report_figure

    metrics = {n: {"perplexity": p, "answers": 10} for n, p in (("base", 7.0), ("sft", 3.0), ("tuned", 3.2))}
    report = {"run": "r", "base_model": "m", "columns": LABELS, "metrics": metrics,
              "behaviour": behaviour(clustered)}
    fig = report_figure(json.loads(json.dumps(report)))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[-2:] == ["reward judge: mean reward, 95% CI", "win rate over the stage before, 95% CI"]
    labels = [t.get_text() for t in fig.axes[-1].get_xticklabels()]
    assert labels == ["SFT > base\nreward, len-matched", "SFT+DPO > SFT\nreward, len-matched"]


class PositionAJudge:
    """Always prefers whatever is shown first, and says yes to anything."""

    def label_logprobs(self, messages, labels):
        by_label = {"A": math.log(0.8), "B": math.log(0.2), "Yes": math.log(0.8), "No": math.log(0.2)}
        return [by_label.get(label.strip(), math.log(0.5)) for label in labels]

    def describe(self):
        return {"backend": "fake", "model": "position-a"}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from fine_tune_llm.data import rows as data
    from fine_tune_llm.train.lineage import preference_config
    from fine_tune_llm.train.preference import train_preference
    from tests.conftest import train_tiny

    root = tmp_path_factory.mktemp("behaviour")
    copy = root / "pairs.jsonl"
    shutil.copyfile(data.SAMPLE_DATA, copy)
    _cfg, result = train_tiny(root, "sft", dataset=str(copy), max_steps=6, eval_steps=6, save_steps=6)
    return train_preference(preference_config(result.run.path, max_steps=4, eval_steps=4, save_steps=4),
                            resume=False).run


def test_evaluate_judges_by_default_and_a_position_biased_judge_reads_as_chance(dpo_run, tmp_path):
    from fine_tune_llm.eval.evaluate import evaluate_run

    report = evaluate_run(dpo_run, n_generations=4, max_new_tokens=12, metrics_dir=tmp_path, progress=False,
                          judge=PositionAJudge())
    b = report["behaviour"]
    assert b["split"]["clustered"] and b["split"]["levels"][0]["test_questions"] > 0
    assert [w["stage"] for w in b["reward"]["win_rates"]] == ["sft", "tuned"]
    assert b["reward"]["columns"]["tuned"]["answers"] == 4 and (dpo_run.reward_judge_dir / "judge.json").is_file()
    assert set(b["safety"]["columns"]) == {"base", "sft", "tuned"} and b["safety"]["questions"] >= 10
    wins = b["llm_judge"]["win_rates"]
    assert [w["win_rate"] for w in wins] == [pytest.approx(0.5), pytest.approx(0.5)]  # both orders cancel it
    assert wins[0]["position_bias"] == pytest.approx(0.3)
    assert "no better than chance" in b["llm_judge"]["calibration"]["verdict"]
    text = dpo_run.report_md.read_text()
    assert "## Did the behaviour change?" in text and "### LLM judge" in text and "backend fake" in text
    assert "> " + RUBRIC_FIRST_LINE in text
    with open(tmp_path / "runs.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["tuned_judge_win_rate"]) == pytest.approx(0.5) and row["rm_accuracy_length_matched"]
