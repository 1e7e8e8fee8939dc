"""The before/after table of lm-evaluation-harness results: one row per task and metric, a value per column (with
the harness's standard error), each tuned column's change from the base with its standard error, and any drop
larger than twice that standard error flagged.

The change's standard error is paired where lm-eval logged a value per item for both columns (every task; not the
groups): every column answers the same items, so the spread of the per-item differences is the honest measure, and
it is much smaller than the unpaired one when the columns agree on most items. For a group it is the unpaired
sqrt(se_base^2 + se_tuned^2) from the harness's own standard errors, which overstates it (conservative).
No lm_eval import here: the report and the model card render a stored result without the optional group.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

FLAG_SIGMAS = 2.0
PAIRS_TASK = "heldout_pairs"  # eval/harness.py's task built from the run's split
CSV_COLUMNS = ["created", "run", "base_model", "split", "task", "metric", "n", "column", "value", "stderr", "change",
               "change_stderr", "paired", "flagged", "limit", "git_commit"]


def summarize(raw: dict[str, dict[str, Any]], limit: int | None = None, pairs: dict[str, Any] | None = None,
              lm_eval_version: str | None = None) -> dict[str, Any]:
    """report["harness"] from run_harness's {column: {"results", "seconds"}}; the first column is the base."""
    names = list(raw)
    results = {name: raw[name]["results"] for name in names}
    base = results[names[0]]
    children = {c for kids in base.get("group_subtasks", {}).values() for c in kids}
    rows = []
    for task, metrics in base["results"].items():
        for metric, filt in _metric_keys(metrics):
            rows.append(_row(task, metric, filt, results, names, top=task not in children))
    return {"lm_eval": lm_eval_version, "limit": limit, "pairs_task": pairs, "columns": names,
            "seconds": {name: round(raw[name]["seconds"], 1) for name in names}, "rows": rows}


def _metric_keys(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """("acc", "none") for lm-eval's "acc,none"; stderr entries and non-numeric values left out."""
    keys = []
    for key, value in metrics.items():
        metric, sep, filt = key.partition(",")
        if sep and not metric.endswith("_stderr") and _number(value) is not None:
            keys.append((metric, filt))
    return keys


def _row(task: str, metric: str, filt: str, results: dict[str, dict], names: list[str], top: bool) -> dict[str, Any]:
    key, err = f"{metric},{filt}", f"{metric}_stderr,{filt}"
    values = {n: _number(results[n]["results"].get(task, {}).get(key)) for n in names}
    stderr = {n: _number(results[n]["results"].get(task, {}).get(err)) for n in names}
    items = {n: _per_item(results[n].get("samples", {}).get(task), metric, filt) for n in names}
    better = results[names[0]].get("higher_is_better", {}).get(task, {}).get(metric)
    changes = {}
    for n in names[1:]:
        if values[n] is None or values[names[0]] is None:
            continue
        change = values[n] - values[names[0]]
        se = paired_stderr(items[names[0]], items[n])
        paired = se is not None
        if not paired and stderr[n] is not None and stderr[names[0]] is not None:
            se = math.hypot(stderr[n], stderr[names[0]])
        changes[n] = {"change": change, "stderr": se, "paired": paired, "flagged": is_drop(change, se, better)}
    n_items = results[names[0]].get("n-samples", {}).get(task, {}).get("effective")
    return {"task": task, "metric": metric if filt == "none" else f"{metric} ({filt})", "top": top,
            "n": n_items if n_items is not None else results[names[0]]["results"][task].get("sample_len"),
            "higher_is_better": better, "values": values, "stderr": stderr, "changes": changes}


def _per_item(samples: list[dict[str, Any]] | None, metric: str, filt: str) -> dict[int, float]:
    out = {}
    for s in samples or []:
        value = _number(s.get(metric))
        if value is not None and s.get("filter", "none") == filt:
            out[s["doc_id"]] = value
    return out


def paired_stderr(before: dict[int, float], after: dict[int, float]) -> float | None:
    """Standard error of the mean per-item difference over the items both columns scored (None under 2 items)."""
    diffs = [after[k] - before[k] for k in before.keys() & after.keys()]
    n = len(diffs)
    if n < 2 or n < len(before):
        return None  # not the same items: the aggregate's change is not this mean
    mean = math.fsum(diffs) / n
    return math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def is_drop(change: float, stderr: float | None, higher_is_better: bool | None) -> bool:
    """A change in the worse direction larger than FLAG_SIGMAS standard errors (unknown direction: never)."""
    if stderr is None or higher_is_better is None:
        return False
    worse = change < 0 if higher_is_better else change > 0
    return worse and abs(change) > FLAG_SIGMAS * stderr


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --- rendering -----------------------------------------------------------------------------------------------------

def markdown(report: dict[str, Any], heading: str = "##") -> list[str]:
    """The table for report.md and the model card; [] when the report has no harness results."""
    h = report.get("harness")
    if not isinstance(h, dict) or not h.get("rows"):
        return []
    labels = report.get("columns") or {}
    names = [n for n in h["columns"] if n in labels] or h["columns"]
    label = {n: labels.get(n, n) for n in names}
    tuned = names[1:]
    top = [r for r in h["rows"] if r.get("top")]
    lines = [f"{heading} Standard benchmarks (lm-evaluation-harness)", "",
             (f"EleutherAI's lm-evaluation-harness {h.get('lm_eval') or ''} on the same model and weights as the "
              f"columns above"
              + (f", limited to the first {h['limit']} items of each task (a quick look, not a score)"
                 if h.get("limit") else "") + ". Change = column - base, with its standard error; **drop** marks a "
              f"change in the worse direction larger than {FLAG_SIGMAS:g} standard errors."), "",
             "| task | metric | items | " + " | ".join(label[n] for n in names) + " | "
             + " | ".join(f"change {label[n]}" for n in tuned) + " |",
             "|---|---|---|" + "---|" * (len(names) + len(tuned))]
    for r in top:
        cells = [_value(r["values"].get(n), r["stderr"].get(n)) for n in names]
        cells += [_change(r["changes"].get(n)) for n in tuned]
        lines.append(f"| {r['task']} | {r['metric']} | {r['n'] if r['n'] is not None else 'n/a'} | "
                     + " | ".join(cells) + " |")
    notes = []
    if any(not c["paired"] and c["stderr"] is not None for r in top for c in r["changes"].values()):
        notes.append("A change marked (u) has the unpaired standard error of a group (conservative); the others "
                     "are paired over the items both columns answered.")
    hidden = len(h["rows"]) - len(top)
    if hidden:
        notes.append(f"{hidden} more rows (the groups' subtasks) are in report.json and harness.csv.")
    check = cross_check(report)
    if check:
        notes.append(check)
    notes.append("Harness wall time: " + ", ".join(f"{label[n]} {h['seconds'].get(n, 0):.0f} s" for n in names)
                 + ".")
    return lines + [""] + [" ".join(notes)]


def cross_check(report: dict[str, Any]) -> str:
    """lm-eval's acc on the run's own pairs next to our raw-sum preference accuracy on the split."""
    h, metrics = report.get("harness") or {}, report.get("metrics") or {}
    row = next((r for r in h.get("rows", []) if r["task"] == PAIRS_TASK and r["metric"] == "acc"), None)
    if row is None:
        return ""
    labels = report.get("columns") or {}
    parts = [f"{labels.get(n, n)} {v:.4f} (ours {metrics[n]['accuracy_sum']:.4f})" for n, v in row["values"].items()
             if v is not None and isinstance(metrics.get(n), dict) and "accuracy_sum" in metrics[n]]
    pairs = (h.get("pairs_task") or {}).get("pairs")
    ours = (metrics.get(h["columns"][0]) or {}).get("pairs")
    same = (" on the same pairs" if pairs == ours and row["n"] == pairs else
            f" (harness: {row['n']} pairs, ours: {ours}; pairs cut at max_length or past --limit differ)")
    return (f"`{PAIRS_TASK}` is the split's preference pairs as a two-choice task; lm-eval's acc there is the raw-sum "
            f"preference accuracy computed by the harness{same}: " + ", ".join(parts) + ".")


def _value(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _change(c: dict[str, Any] | None) -> str:
    if not c:
        return "n/a"
    se = f" ± {c['stderr']:.4f}" + ("" if c["paired"] else " (u)") if c["stderr"] is not None else ""
    return f"{c['change']:+.4f}{se}" + (" **drop**" if c["flagged"] else "")


def drops(report: dict[str, Any]) -> str | None:
    """runs.csv's summary: the flagged drops, "none", or None when the harness did not run."""
    h = report.get("harness")
    if not isinstance(h, dict):
        return None
    labels = report.get("columns") or {}
    found = [f"{r['task']}/{r['metric']} {labels.get(n, n)} {c['change']:+.4f}"
             for r in h.get("rows", []) for n, c in r["changes"].items() if c["flagged"]]
    return "; ".join(found) or "none"


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task, metric and column: the whole table, subtasks included."""
    h = report["harness"]
    common = {"created": report.get("created"), "run": report.get("run"), "base_model": report.get("base_model"),
              "split": (report.get("settings") or {}).get("split"), "limit": h.get("limit"),
              "git_commit": (report.get("git") or {}).get("commit")}
    out = []
    for r in h["rows"]:
        for n in h["columns"]:
            c = r["changes"].get(n) or {}
            out.append({**common, "task": r["task"], "metric": r["metric"], "n": r["n"], "column": n,
                        "value": r["values"].get(n), "stderr": r["stderr"].get(n), "change": c.get("change"),
                        "change_stderr": c.get("stderr"), "paired": c.get("paired"), "flagged": c.get("flagged")})
    return out


def append_csv(path: str | Path, report: dict[str, Any]) -> Path:
    """harness.csv beside runs.csv: every evaluation's harness table, one row per task, metric and column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or not path.stat().st_size
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(csv_rows(report))
    return path
