"""The evaluation report: report.json (everything), report.md (for people), one row in metrics/runs.csv."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..files import locked_append, locked_rewrite, write_atomic
from ..manifest import git_state, hardware, library_versions
from ..run import RunDir
from . import behaviour_report, harness_report

RUNS_COLUMNS = [
    "created", "run", "run_dir", "base_model", "preset", "global_step", "split", "answers", "pairs",
    "base_perplexity", "tuned_perplexity", "base_bits_per_byte", "tuned_bits_per_byte",
    "base_accuracy_normalized", "tuned_accuracy_normalized", "base_accuracy_sum", "tuned_accuracy_sum",
    "base_mean_margin", "tuned_mean_margin", "tuned_margin_ci95_low", "tuned_margin_ci95_high",
    "tuned_hit_max_tokens_greedy", "harness_drops", *behaviour_report.RUNS_COLUMNS, "git_commit", "wall_seconds",
]


def build_report(run: RunDir, cfg: TrainConfig, settings: dict[str, Any], metrics: dict[str, dict[str, Any]],
                 labels: dict[str, str], generations: dict[str, list[dict[str, Any]]],
                 lengths: dict[str, dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """metrics, labels and lengths are keyed by column: "base", ("sft",) "tuned" (the run's own adapter)."""
    base, tuned = metrics["base"], metrics["tuned"]
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run.name,
        "run_dir": str(run.path),
        "base_model": cfg.base_model,
        "stage": cfg.stage,
        "adapter": str(run.adapter_dir),
        "global_step": (run.trainer_state() or {}).get("global_step"),
        "settings": settings,
        "columns": labels,
        "metrics": metrics,
        "deltas": deltas(base, tuned),
        **({"deltas_vs_sft": deltas(metrics["sft"], tuned)} if "sft" in metrics else {}),
        "generation_lengths": lengths,
        "generations": generations,
        "hit_max_tokens": {mode: {who: sum(g[who]["hit_max_tokens"] for g in rows) for who in labels}
                           for mode, rows in generations.items()},
        "config": cfg.to_dict(),
        "libraries": library_versions(),
        "git": git_state(),
        "hardware": hardware(),
        "wall_seconds": round(wall_seconds, 2),
    }


# Compared in report["deltas"] (tuned minus base).
DELTA_KEYS = ["perplexity", "bits_per_byte", "loss", "accuracy_normalized", "accuracy_sum", "mean_margin",
              "mean_margin_sum"]


def deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in DELTA_KEYS if k in before and k in after}


def write_report(run: RunDir, report: dict[str, Any]) -> tuple[Path, Path]:
    write_atomic(run.report_json, json.dumps(report, indent=2, default=str))
    write_atomic(run.report_md, render_markdown(report))
    return run.report_json, run.report_md


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _ci(m: dict[str, Any]) -> str:
    lo, hi = m.get("margin_ci95", (None, None))
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


METRIC_ROWS = [
    ("perplexity", "Perplexity (answer tokens; lower is better)"),
    ("bits_per_byte", "Bits per byte (lower is better)"),
    ("accuracy_normalized", "Preference accuracy, length-normalized"),
    ("accuracy_sum", "Preference accuracy, raw sum (length-biased)"),
    ("mean_margin", "Mean margin, nats/token (chosen - rejected)"),
]


def render_markdown(report: dict[str, Any]) -> str:
    labels = report.get("columns") or {"base": "base", "tuned": "tuned"}
    m, s = report["metrics"], report["settings"]
    base = m["base"]
    names = list(labels)
    lines = [
        f"# Evaluation of `{report['run']}`",
        "",
        (f"Base model `{report['base_model']}` and " + " / ".join(labels[n] for n in names[1:])
         + f" (`{report['adapter']}`, step {report['global_step']}), on the held-out **{s['split']}** split: "
         f"{base['answers']} answers, {base.get('pairs', 0)} preference pairs. Weights: "
         f"{s.get('weights', 'as configured')}; batch size {s['batch_size']}."),
        "",
        "| metric | " + " | ".join(labels[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in METRIC_ROWS:
        if key in base:
            lines.append(f"| {label} | " + " | ".join(_fmt(m[n].get(key)) for n in names) + " |")
    if base.get("pairs"):
        lines.append("| Mean margin 95% CI (bootstrap) | " + " | ".join(_ci(m[n]) for n in names) + " |")
    lengths = report.get("generation_lengths") or {}
    if lengths:
        lines.append("| Greedy answers: mean generated tokens | "
                     + " | ".join(_fmt(lengths[n]["mean_new_tokens"], 1) for n in names) + " |")
        lines.append("| Greedy answers that ended their turn by themselves | "
                     + " | ".join(f"{lengths[n]['ended_turn']}/{lengths[n]['answers']}" for n in names) + " |")
    if s.get("no_pairs"):
        lines += ["", f"No preference metrics: {s['no_pairs']}."]
    if base.get("pairs"):
        lines += [
            "",
            (f"Preference pairs are (prompt, chosen, rejected): the final answer against its rejected alternative, "
             f"given the same earlier turns. The chosen answer is the longer one in "
            f"{100 * base['chosen_longer']:.1f}% of pairs. Every extra token lowers a summed log-likelihood, so the "
            f"raw-sum accuracy favours the shorter answer; the length-normalized accuracy and margin (mean log-prob "
            f"per answer token) are the fair ones. A preference stage can also learn \"longer\" instead of the "
            f"intended difference: compare the generated lengths across columns. Accuracy saturates when the base "
            f"model already prefers the chosen answers; the mean margin shows how far each stage moved."),
        ]
    trained = ("the final assistant turn of each conversation" if s.get("train_on") == "last"
               else "every assistant turn of each conversation")
    lines += ["", (f"Perplexity = exp(total answer NLL / total answer tokens), over {trained} and its end-of-turn "
                   f"token: the tokens training learns. Bits per byte = total NLL / ln 2 / UTF-8 bytes of those "
                   f"answers.{_data_line(s.get('data'))}")]
    behaviour = behaviour_report.markdown(report)
    lines += ["", *behaviour] if behaviour else []
    harness = harness_report.markdown(report)
    lines += ["", *harness] if harness else []
    for mode, rows in report.get("generations", {}).items():
        hits = report["hit_max_tokens"][mode]
        lines += ["", f"## Generations, {mode}"
                  + (f" (seed {s['seed']}, {_sampling(s)})" if mode == "sampled" else ""),
                  "", (f"max_new_tokens={s['max_new_tokens']}; answers that hit it without ending their turn: "
                      + ", ".join(f"{labels[n]} {hits[n]}" for n in names) + "."), "",
                  "| question | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---|" * len(names)]
        for g in rows:
            lines.append(f"| {_prompt_cell(g)} | " + " | ".join(_cell(_answer(g[n])) for n in names) + " |")
    lines += ["", f"Wall time {report['wall_seconds']:.0f} s. Git commit {report['git'].get('commit')}"
              + (" (uncommitted changes)" if report["git"].get("dirty") else "") + ". Libraries: "
              + ", ".join(f"{k} {v}" for k, v in report["libraries"].items() if v) + ".", ""]
    return "\n".join(lines)


def _sampling(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.get("sampling", {}).items() if v is not None) or "defaults"


def _answer(a: dict[str, Any]) -> str:
    return a["answer"] + (" [hit max_new_tokens]" if a["hit_max_tokens"] else "")


def _prompt_cell(generation: dict[str, Any]) -> str:
    """The question, after the earlier turns of its conversation (if any), each named by its speaker."""
    earlier = [f"*{m['role']}:* {_cell(m['content'])}" for m in generation.get("context", [])]
    last = f"**user:** {_cell(generation['question'])}" if earlier else _cell(generation["question"])
    return "<br>".join([*earlier, last])


def _data_line(data: dict[str, Any] | None) -> str:
    if not data or not data.get("format"):
        return ""
    return (f" Data read as format `{data['format']}` ({data.get('chosen_by', '')}): {data.get('rows', 0):,} rows, "
            f"{data.get('multi_turn', 0):,} multi-turn, {data.get('assistant_turns', 0):,} assistant turns; split by "
            f"{data.get('group_key', 'question')}.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def runs_row(report: dict[str, Any]) -> dict[str, Any]:
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    ci = tuned.get("margin_ci95", [None, None])
    row = {
        "created": report["created"], "run": report["run"], "run_dir": report["run_dir"],
        "base_model": report["base_model"], "preset": report["config"].get("preset"),
        "global_step": report["global_step"], "split": report["settings"]["split"], "answers": base["answers"],
        "pairs": base.get("pairs", 0), "tuned_margin_ci95_low": ci[0], "tuned_margin_ci95_high": ci[1],
        "tuned_hit_max_tokens_greedy": report["hit_max_tokens"].get("greedy", {}).get("tuned"),
        "git_commit": report["git"].get("commit"), "wall_seconds": report["wall_seconds"],
        "harness_drops": harness_report.drops(report),  # the table itself: harness.csv
        **behaviour_report.runs_fields(report),
    }
    for key in ("perplexity", "bits_per_byte", "accuracy_normalized", "accuracy_sum", "mean_margin"):
        row[f"base_{key}"], row[f"tuned_{key}"] = base.get(key), tuned.get(key)
    return row


def append_runs_csv(path: Path, report: dict[str, Any]) -> Path:
    """One row per evaluation, so runs compare over time. A file written before a column existed is rewritten
    with it first (old rows leave it empty), so a new number is never dropped. Runs evaluated at the same moment
    share the file: each append holds a lock on it (files.locked_append), so rows never mix."""
    path = Path(path)
    if path.is_file():
        locked_rewrite(path, _widened)
    with locked_append(path) as (header, rows):
        columns = next(csv.reader([header])) if header.strip() else RUNS_COLUMNS
        writer = csv.DictWriter(rows, fieldnames=columns, extrasaction="ignore")
        if not header.strip():
            writer.writeheader()
        writer.writerow(runs_row(report))
    return path


def _widened(text: str) -> str:
    """runs.csv with every column of RUNS_COLUMNS it lacks added at its end; old rows leave them empty."""
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    columns = next(csv.reader([text.partition("\n")[0]])) if text.strip() else []
    missing = [c for c in RUNS_COLUMNS if c not in columns]
    if not columns or not missing:
        return text
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns + missing)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
