"""Generated answers scored by the reward judge: each column's mean reward, and each stage's win rate over the one
before it, raw and length-matched.

    score_generations(judge, prompts, {"base": [...], "sft": [...], "tuned": [...]}, order=["base", "sft", "tuned"])

A win rate compares the two answers to the same question (paired), a tie counts half, and its 95% interval is a
percentile bootstrap over questions. The raw win rate reads each answer whole; the length-matched one reads both
answers of a question cut to the shorter one's length (reward_pairs.py), so a stage that only writes longer
answers gains nothing there. A raw win the matched one does not confirm is a win of length, not of content.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from . import reward_pairs as rp
from .scoring import bootstrap_ci


def reward_summary(rewards: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean reward with its 95% bootstrap interval over questions."""
    lo, hi = bootstrap_ci(rewards, n_boot=n_boot, seed=seed)
    return {"mean_reward": float(np.mean(rewards)) if len(rewards) else float("nan"), "ci95": [lo, hi],
            "answers": len(rewards)}


def win_rate(new: Sequence[float], old: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How often `new` beats `old` on the same question (ties half), with a 95% bootstrap interval over questions."""
    if len(new) != len(old):
        raise ValueError(f"win_rate needs paired rewards, got {len(new)} and {len(old)}")
    diff = np.asarray(new, dtype=float) - np.asarray(old, dtype=float)
    outcome = (diff > 0) + 0.5 * (diff == 0)
    lo, hi = bootstrap_ci(outcome, n_boot=n_boot, seed=seed)
    return {"win_rate": float(outcome.mean()) if len(diff) else float("nan"), "ci95": [lo, hi],
            "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
            "questions": len(diff)}


def score_generations(judge, prompts: Sequence[str | list[dict[str, str]]],
                      answers_by_column: dict[str, Sequence[str]], order: Sequence[str] | None = None,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per column (in `order`, default the dict's): the reward of each answer, their mean with its CI and the mean
    answer tokens read; per consecutive pair of columns (sft over base, tuned over sft): raw and length-matched win
    rates, and how often the later stage's answer was the longer. `judge` is a reward_judge.RewardJudge."""
    order = list(order or answers_by_column)
    missing = [c for c in order if c not in answers_by_column]
    if missing:
        raise ValueError(f"order names columns with no answers: {missing}")
    for column in order:
        if len(answers_by_column[column]) != len(prompts):
            raise ValueError(f"column {column!r} has {len(answers_by_column[column])} answers for {len(prompts)} "
                             f"prompts")
    cap, end = judge.options.max_answer_tokens, judge.end
    encoded = {c: judge.answers(prompts, answers_by_column[c]) for c in order}
    rewards = {c: judge.score([rp.whole(a, cap, end) for a in encoded[c]]) for c in order}
    columns = {c: {**reward_summary(rewards[c], n_boot, seed),
                   "mean_tokens": float(np.mean([min(len(a.tokens), cap) for a in encoded[c]])) if prompts else 0.0}
               for c in order}
    comparisons = []
    for old, new in pairwise(order):
        first, second = rp.pair_sequences(encoded[new], encoded[old], "matched", cap, end)
        matched = judge.score(first + second)
        longer = [min(len(a.tokens), cap) > min(len(b.tokens), cap) for a, b in zip(encoded[new], encoded[old])]
        comparisons.append({"stage": new, "over": old, "raw": win_rate(rewards[new], rewards[old], n_boot, seed),
                            "matched": win_rate(matched[:len(first)], matched[len(first):], n_boot, seed),
                            "longer": float(np.mean(longer)) if longer else float("nan")})
    return {"order": order, "columns": columns, "win_rates": comparisons, "rewards": rewards,
            "judge": judge.record.get("heldout", {})}


__all__ = ["reward_summary", "score_generations", "win_rate"]
