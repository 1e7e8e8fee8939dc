"""The tiny preset end to end on conversational data built from the real chatterbot corpus: SFT, evaluation and the
preference stage from a ShareGPT file, a messages file and a conversational prompt/chosen/rejected file; and a file
without rejected answers, where the preference stage and metrics say why they cannot run."""

from __future__ import annotations

import json

import pytest

from fine_tune_llm.errors import DataError
from fine_tune_llm.eval.evaluate import evaluate_run
from fine_tune_llm.run import RunDir
from fine_tune_llm.train.lineage import preference_config
from fine_tune_llm.train.preference import train_preference
from tests.conftest import chatterbot_rows, train_tiny

SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
STEPS = {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_length": 160}


def conversations(n: int = 48) -> list[list[dict[str, str]]]:
    """Short multi-turn conversations first (the data has 2- and 3-exchange ones), then single exchanges; one in
    four opens with a system message, which the tiny Gemma template folds into the first user turn."""
    rows = list({json.dumps(r["messages"]): r["messages"] for r in chatterbot_rows()}.values())  # no repeats
    multi = [m for m in rows if 4 <= len(m) <= 6 and sum(len(t["content"]) for t in m) < 400][:16]
    single = [m for m in rows if len(m) == 2 and len(m[1]["content"]) < 200][::7][: n - len(multi)]
    chosen = multi + single
    return [[{"role": "system", "content": "You are a helpful support bot."}, *m] if i % 4 == 0 else m
            for i, m in enumerate(chosen)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversation-data")
    convs = conversations()
    # A rejected answer: another conversation's final answer, off-topic for this one.
    rejected = [convs[(i + 1) % len(convs)][-1]["content"] for i in range(len(convs))]
    return {
        "sharegpt": write(root / "sharegpt.jsonl", [
            {"conversations": [{"from": SHAREGPT[t["role"]], "value": t["content"]} for t in c],
             "rejected": {"from": "gpt", "value": r}} for c, r in zip(convs, rejected)]),
        "messages": write(root / "messages.jsonl", [{"messages": c, "rejected": r} for c, r in zip(convs, rejected)]),
        "prompt-chosen-rejected": write(root / "preference.jsonl", [
            {"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": r}]}
            for c, r in zip(convs, rejected)]),
        "plain": write(root / "plain.jsonl", [{"messages": c} for c in convs]),
    }


@pytest.mark.parametrize("fmt", ["sharegpt", "messages", "prompt-chosen-rejected"])
def test_sft_evaluation_and_the_preference_stage_run_from_each_conversational_format(files, fmt, tmp_path):
    cfg, sft = train_tiny(tmp_path, "sft", dataset=str(files[fmt]), **STEPS)
    record = json.loads(sft.run.splits_file.read_text())["data"]
    assert record["format"] == fmt and record["chosen_by"] == "detected from the columns"
    assert record["multi_turn"] == 16 and record["with_rejected"] == record["rows"] == 48
    losses = [h["loss"] for h in sft.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)

    report = evaluate_run(sft.run, n_generations=2, max_new_tokens=8, metrics_dir=tmp_path, progress=False)
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    test_rows = RunDir.of(cfg.output_dir).load_splits()["test"]
    assert base["answers"] == len(test_rows) and base["pairs"] >= 1 and tuned["answer_tokens"] == base["answer_tokens"]
    assert report["settings"]["data"]["format"] == fmt and report["settings"]["no_pairs"] is None
    assert report["generations"]["greedy"][0].get("context") or not any(
        len(r.get("messages", [])) > 3 for r in test_rows)  # a multi-turn prompt is answered first when there is one

    dpo = train_preference(preference_config(sft.run.path, max_steps=2, eval_steps=2, save_steps=2, logging_steps=1))
    dpo_losses = [h["loss"] for h in dpo.log_history if "loss" in h]
    assert dpo.global_step == 2 and dpo_losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
    assert json.loads(dpo.run.splits_file.read_text())["data"]["format"] == fmt


def test_without_rejected_answers_the_preference_stage_and_metrics_say_why(files, tmp_path):
    _cfg, sft = train_tiny(tmp_path, "sft", dataset=str(files["plain"]), **STEPS)
    report = evaluate_run(sft.run, n_generations=1, max_new_tokens=8, metrics_dir=tmp_path, progress=False)
    why = ("the rows have no rejected answer: the data is read as format 'messages' (detected from the columns), "
           "without a 'rejected' column")
    assert report["metrics"]["base"]["pairs"] == 0 and report["settings"]["no_pairs"] == why
    assert f"No preference metrics: {why}." in sft.run.report_md.read_text()
    cfg = preference_config(sft.run.path, max_steps=2)
    with pytest.raises(DataError, match=r"has no rejected answer: the preference stage needs pairs; the data is read "
                                        r"as format 'messages' \(detected from the columns\), without a 'rejected' "
                                        r"column; rows with a rejected answer are"):
        train_preference(cfg)
    assert not RunDir.of(cfg.output_dir).path.exists()  # refused before anything was written
