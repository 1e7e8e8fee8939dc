"""The judged part of a report (eval/behaviour.py) for people: markdown sections and runs.csv fields."""

from __future__ import annotations

import math
from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def split_lines(split: dict[str, Any]) -> list[str]:
    levels = split["levels"]
    at = ", ".join(f"{lv['with_near_twin']} ({_pct(lv['fraction'])}) at Jaccard >= {lv['threshold']:g}"
                   for lv in levels)
    old = "" if split["clustered"] else (" This run's split was saved before near-duplicate clustering and is "
                                         "kept as saved: its held-out numbers include paraphrases of training "
                                         "questions.")
    return [(f"Held-out split grouped by {split['grouping']}. Test questions with a near-twin among the training "
            f"questions (word-set Jaccard): {at}, of {levels[0]['test_questions']}.{old}")]


def reward_lines(reward: dict[str, Any], labels: dict[str, str]) -> list[str]:
    held = reward.get("judge") or {}
    raw, matched, half = held.get("raw") or {}, held.get("matched") or {}, held.get("half") or {}
    order = reward["order"]
    options = reward.get("options") or {}
    sized = (f" Trained on {reward.get('train_pairs')} pairs" + (f", the top {options['lora_layers']} blocks"
             if options.get("lora_layers") else "") + f", in {_num(reward.get('train_seconds'), 0)} s "
             "(JudgeOptions: a CPU runs a smaller judge than a GPU).") if reward.get("train_pairs") else ""
    lines = ["### Reward-model judge",
             "",
             (f"A reward model trained on this run's own training pairs (chosen vs rejected answers, both cut to one "
              f"length inside both, so that neither length nor a natural ending can be its signal).{sized} On "
              f"{held.get('pairs', 'n/a')} held-out test pairs it prefers the chosen answer "
              f"{_pct(raw.get('accuracy'))} {_ci(raw.get('ci95'))} of the time as they are, "
              f"{_pct(matched.get('accuracy'))} {_ci(matched.get('ci95'))} with both cut to the shorter's length, and "
              f"**{_pct(half.get('accuracy'))} {_ci(half.get('ci95'))} length-matched with neither ending where its "
              f"author ended it** (content only)."
              + (" That is no better than chance: read its rewards as noise."
                 if half.get("ci95") and half["ci95"][0] <= 0.5 else "")),
             "",
             "| | " + " | ".join(labels[c] for c in order) + " |",
             "|---|" + "---|" * len(order),
             "| mean reward [95% CI] | " + " | ".join(
                 f"{_num(reward['columns'][c]['mean_reward'])} [{_num(reward['columns'][c]['ci95'][0])}, "
                 f"{_num(reward['columns'][c]['ci95'][1])}]" for c in order) + " |",
             "| answer tokens read (mean) | " + " | ".join(
                 f"{reward['columns'][c]['mean_tokens']:.0f}" for c in order) + " |",
             "",
             "| win rate | raw [95% CI] | length-matched [95% CI] | answers longer |",
             "|---|---|---|---|"]
    for w in reward["win_rates"]:
        lines.append(f"| {labels[w['stage']]} over {labels[w['over']]} | {_pct(w['raw']['win_rate'])} "
                     f"{_ci(w['raw']['ci95'])} | {_pct(w['matched']['win_rate'])} {_ci(w['matched']['ci95'])} | "
                     f"{_pct(w['longer'])} |")
    return lines


def safety_lines(safety: dict[str, Any], labels: dict[str, str]) -> list[str]:
    cols = safety["columns"]
    names = list(cols)
    harmful = " | ".join("n/a" if cols[c]["harmful"] is None else f"{cols[c]['harmful']}/{cols[c]['answers']}"
                         for c in names)
    return ["### Safety probe", "",
            (f"{safety['questions']} crisis-type questions written for this project, answered greedily by every "
             f"column ({safety['method']}). {safety['note']}"), "",
            "| | " + " | ".join(labels.get(c, c) for c in names) + " |", "|---|" + "---|" * len(names),
            "| points to professional or crisis help | " + " | ".join(
                f"{cols[c]['points_to_help']}/{cols[c]['answers']}" for c in names) + " |",
            "| gives harmful advice | " + harmful + " |"]


def llm_judge_lines(section: dict[str, Any], labels: dict[str, str]) -> list[str]:
    judge = section["judge"]
    named = ", ".join(f"{k} {v}" for k, v in judge.items()) if isinstance(judge, dict) else str(judge)
    lines = ["### LLM judge", "", (f"Judge: {named}. Every comparison is asked in both orders; the verdict is the "
             "judge's probability of each label, averaged over the two orders.")]
    cal = section.get("calibration")
    if cal:
        lines += ["", (f"Calibration on {cal['pairs']} held-out reference pairs: agrees with the dataset's labels "
                       f"{_pct(cal['agreement'])} {_ci(cal['agreement_ci95'])} as they are, "
                       f"{_pct(cal['length_matched']['agreement'])} {_ci(cal['length_matched']['agreement_ci95'])} "
                       f"length-matched; position bias {_num(cal['position_bias'])}. **{cal['verdict']}**")]
    if section["win_rates"]:
        lines += ["", "| win rate | raw [95% CI] | length-controlled [95% CI] | position bias |",
                  "|---|---|---|---|"]
        for w in section["win_rates"]:
            new, old = w["columns"]
            lines.append(f"| {labels[new]} over {labels[old]} | {_pct(w['win_rate'])} {_ci(w['win_rate_ci95'])} | "
                         f"{_pct(w['lc_win_rate'])} {_ci(w['lc_win_rate_ci95'])} | {_num(w['position_bias'])} |")
        rubric = section["win_rates"][0]["rubric"]
        lines += ["", "Rubric given to the judge:", "", *[f"> {line}" if line else ">" for line in rubric.splitlines()]]
    return lines


def markdown(report: dict[str, Any]) -> list[str]:
    behaviour = report.get("behaviour")
    if not behaviour:
        return []
    labels = report.get("columns") or {}
    lines = ["## Did the behaviour change?", "", *split_lines(behaviour["split"])]
    if "reward" in behaviour:
        lines += ["", *reward_lines(behaviour["reward"], labels)]
    elif behaviour.get("reward_skipped"):
        lines += ["", f"No reward-model judge: {behaviour['reward_skipped']}."]
    if "safety" in behaviour:
        lines += ["", *safety_lines(behaviour["safety"], labels)]
    if "llm_judge" in behaviour:
        lines += ["", *llm_judge_lines(behaviour["llm_judge"], labels)]
    return lines


def runs_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The judged numbers runs.csv carries: leakage, the reward judge's accuracy and the tuned column's reward and
    win rate over the stage before it, the safety counts, and the LLM judge's win rates."""
    behaviour = report.get("behaviour") or {}
    out: dict[str, Any] = {}
    split = behaviour.get("split")
    if split:
        out["test_near_twins"] = split["levels"][0]["fraction"]
    reward = behaviour.get("reward")
    if reward:
        held = reward.get("judge") or {}
        out["rm_accuracy_length_matched"] = (held.get("half") or held.get("matched") or {}).get("accuracy")
        out["tuned_mean_reward"] = reward["columns"]["tuned"]["mean_reward"]
        last = reward["win_rates"][-1] if reward["win_rates"] else None
        out["tuned_rm_win_rate"] = last["matched"]["win_rate"] if last else None
    safety = behaviour.get("safety")
    if safety:
        out["base_safety_help"] = safety["columns"]["base"]["points_to_help"]
        out["tuned_safety_help"] = safety["columns"]["tuned"]["points_to_help"]
    judge = behaviour.get("llm_judge")
    if judge and judge["win_rates"]:
        out["tuned_judge_win_rate"] = judge["win_rates"][-1]["win_rate"]
        out["tuned_judge_lc_win_rate"] = judge["win_rates"][-1]["lc_win_rate"]
    return out


RUNS_COLUMNS = ["test_near_twins", "rm_accuracy_length_matched", "tuned_mean_reward", "tuned_rm_win_rate",
                "base_safety_help", "tuned_safety_help", "tuned_judge_win_rate", "tuned_judge_lc_win_rate"]

__all__ = ["RUNS_COLUMNS", "markdown", "runs_fields"]
