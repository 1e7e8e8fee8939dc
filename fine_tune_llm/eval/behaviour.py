"""Did the behaviour change? The judged part of an evaluation, over the answers every column generated.

    split_leakage        how many test questions still have a near-twin in training (the saved split's grouping)
    reward judge         a reward model trained on the run's own train pairs, both answers cut to one length
                         (eval/reward_judge.py): its held-out accuracy, each column's mean reward and the win rate
                         of each stage over the one before, raw and length-matched
    safety probe         crisis-type questions written for this project, answered by every column: pointing to
                         help (rules; a judge too when given), harmful advice (with a judge only) (eval/safety.py)
    LLM judge (--judge)  a stronger model comparing answers pairwise in both orders, calibrated first on the
                         held-out reference pairs, its win rates raw and length-controlled (eval/judge.py)

The reward judge and the safety probe need no extra model, so `evaluate` runs them by default.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from typing import Any

from ..data import splits as saved_splits
from ..data.clusters import leakage_levels
from ..model.generation import BASE, generate_columns
from ..run import RunDir

log = logging.getLogger(__name__)
# Held-out reference pairs the LLM judge is calibrated on, one per question: enough for a CI of about +-10 points.
CALIBRATION_PAIRS = 100


def split_leakage(run: RunDir, threshold: float) -> dict[str, Any]:
    """The saved split's grouping (in words) and its test questions' near-twins in training, at the threshold the
    split used (or the run's option, for a split saved before clustering) and at 0.8 / 0.7."""
    clustering = saved_splits.clustering(run.splits_file)
    splits = run.load_splits()
    at = clustering["threshold"] if clustering else threshold
    return {"grouping": saved_splits.grouping_label(clustering), "clustered": clustering is not None,
            "levels": leakage_levels(splits["train"], splits["test"], at)}


def greedy_answers(generations: dict[str, list[dict[str, Any]]], names: list[str]):
    """(prompts, {column: answers}) of the greedy generations; a prompt is text or the conversation so far."""
    rows = generations.get("greedy", [])
    prompts = [[*g["context"], {"role": "user", "content": g["question"]}] if g.get("context") else g["question"]
               for g in rows]
    return prompts, {name: [g[name]["answer"] for g in rows] for name in names}


def reward_section(run: RunDir, prompts, answers: dict[str, list[str]], names: list[str], seed: int,
                   progress: bool) -> dict[str, Any]:
    from .judge_scores import score_generations
    from .reward_judge import reward_judge

    judge = reward_judge(run, progress=progress)
    scored = score_generations(judge, prompts, answers, names, seed=seed)
    return {**scored, "options": judge.record.get("options"), "train_pairs": judge.record.get("train_pairs"),
            "train_seconds": judge.record.get("train_seconds")}


def safety_section(columns, tokenizer, cfg, max_new_tokens: int, rows: int, seed: int, llm_judge,
                   progress: bool) -> dict[str, Any]:
    from .safety import safety_counts, safety_questions

    questions = safety_questions()
    adapters = {name: BASE if name == "base" else name for name in columns.names}
    out = generate_columns(columns.model, tokenizer, questions, list(adapters.values()), max_new_tokens, seed, rows,
                           cfg.system_prompt, modes=("greedy",), progress=progress)["greedy"]
    answers = {name: [a["answer"] for a in out[adapter]] for name, adapter in adapters.items()}
    return safety_counts(questions, answers, llm_judge, progress=progress)


def calibration_pairs(test_rows: list[dict[str, Any]], n: int = CALIBRATION_PAIRS) -> list[dict[str, Any]]:
    """Up to n held-out pairs, one per question (a question's repeats are not independent), in split order."""
    seen, out = set(), []
    for row in test_rows:
        if row.get("rejected") and row["question"] not in seen:
            seen.add(row["question"])
            out.append(row)
    return out[:n]


def llm_judge_section(llm_judge, test_rows: list[dict[str, Any]], prompts, answers: dict[str, list[str]],
                      names: list[str], seed: int, progress: bool) -> dict[str, Any]:
    from .judge import calibrate, win_rate

    pairs = calibration_pairs(test_rows)
    calibration = calibrate(llm_judge, [r["question"] for r in pairs], [r["answer"] for r in pairs],
                            [r["rejected"] for r in pairs], seed=seed, progress=progress) if pairs else None
    questions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]  # the turn being answered
    wins = [win_rate(llm_judge, questions, answers[new], answers[old], names=(new, old), seed=seed,
                     progress=progress) for old, new in pairwise(names)]
    return {"judge": llm_judge.describe(), "calibration": calibration, "win_rates": wins}


def judge_behaviour(run: RunDir, cfg, columns, tokenizer, test_rows: list[dict[str, Any]],
                    generations: dict[str, list[dict[str, Any]]], judge_spec: Any = None,
                    reward: bool = True, safety: bool = True, max_new_tokens: int = 128, rows: int = 48,
                    seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The report's "behaviour" section: every part that applies, each a dict (see the module docstring)."""
    out: dict[str, Any] = {"split": split_leakage(run, cfg.near_duplicate_threshold)}
    prompts, answers = greedy_answers(generations, columns.names)
    llm_judge = judge_spec if judge_spec is not None and not isinstance(judge_spec, str) else None
    if isinstance(judge_spec, str) and judge_spec:  # else a judge loaded already (judge_backends.load_judge)
        from .judge_backends import load_judge

        llm_judge = load_judge(judge_spec)
    has_pairs = any(r.get("rejected") for r in run.load_splits()["train"])
    if reward and prompts and has_pairs:
        out["reward"] = reward_section(run, prompts, answers, columns.names, seed, progress)
    elif reward:
        out["reward_skipped"] = ("no generated answers to score" if not prompts else
                                 "the train split has no rejected answers to train a reward model on")
    if safety:
        out["safety"] = safety_section(columns, tokenizer, cfg, max_new_tokens, rows, seed, llm_judge, progress)
    if llm_judge is not None and prompts:
        out["llm_judge"] = llm_judge_section(llm_judge, test_rows, prompts, answers, columns.names, seed, progress)
    return out


__all__ = ["calibration_pairs", "judge_behaviour", "split_leakage"]
