"""Saved splits: which rows of the data a run trained, validated and tested on.

Training writes the membership once (`splits.json` in the run directory): the format the data was read in (with
the --columns mapping) and its counts, how near-duplicate prompts were clustered (`clustering`: method, threshold,
MinHash settings; clusters.py), then each split's rows by their 1-based number in the data file, a hash of each
row's content, a hash of each split, each row's group key (hashed) and each row's cluster: rows of one cluster
never straddle two splits. Every later stage (evaluation, merge parity, the model card, the preference stage)
reads it instead of splitting again, so an old run's held-out rows stay what they were when the split code
changes, and an edited data file is caught instead of silently changing what "held-out" means. A record written
before near-duplicate clustering (no `clustering`) loads as it always did, its `clustering` None.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import DamagedFile, DataError
from ..files import json_problem, read_json, sha256_file, write_json
from .rows import Splits, group_key, load_examples, resolve_source

FORMAT = 1  # records without "data" (written before conversations) read as they always did: format auto


def row_hash(example: dict[str, Any]) -> str:
    """What the run saw of a row: its question, trained answer and rejected answer (and its whole conversation)."""
    seen = [example["question"], example["answer"], example.get("rejected")]
    if "messages" in example:
        seen.append(example["messages"])
    text = json.dumps(seen, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_hash(example: dict[str, Any]) -> str:
    return hashlib.sha256(group_key(example).encode()).hexdigest()[:12]


def split_hash(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def membership(splits: Splits, source: str) -> dict[str, Any]:
    """The JSON record of `splits`: rows in the order training used them, with content hashes."""
    resolved = Path(resolve_source(source))
    record: dict[str, Any] = {"format": FORMAT, "source": source,
                              "file_sha256": sha256_file(resolved) if resolved.is_file() else None, "splits": {}}
    summary = getattr(splits, "summary", None)
    if summary:
        record["data"] = {k: v for k, v in summary.items() if k != "splits"}
    clustering, clusters = getattr(splits, "clustering", None), getattr(splits, "clusters", {})
    if clustering:
        record["clustering"] = clustering
    for name, rows in splits.items():
        hashes = [row_hash(r) for r in rows]
        record["splits"][name] = {"count": len(rows), "sha256": split_hash(hashes), "rows": [r["row"] for r in rows],
                                  "row_sha256": hashes, "row_group": [key_hash(r) for r in rows],
                                  **({"row_cluster": [clusters[r["row"]] for r in rows]} if clustering else {}),
                                  **({"counts": summary["splits"][name]} if summary else {})}
    return record


def save(path: str | Path, splits: Splits, source: str) -> Path:
    return write_json(path, membership(splits, source))


def load(path: str | Path, source: str | None = None, hint: str = "") -> Splits:
    """The saved splits' rows, read back from the data file and checked against their hashes.

    Raises DataError naming the file and how many rows differ when the data changed since training: results on
    such rows are not the run's held-out results. A garbled record raises DamagedFile, with `hint` (what to do)."""
    record = read_record(path, hint)
    source = source or record["source"]
    file = resolve_source(source)
    data = record.get("data") or {}
    by_row = {ex["row"]: ex for ex in load_examples(file, data.get("format", "auto"), data.get("columns"))}
    out = Splits({}, {**data, "splits": {n: s.get("counts", {"rows": s["count"]}) for n, s in record["splits"].items()}},
                 clustering=record.get("clustering"))
    changed: dict[str, int] = {}
    for name, saved in record["splits"].items():
        rows = [by_row.get(n) for n in saved["rows"]]
        out.clusters.update(zip(saved["rows"], saved.get("row_cluster", ())))
        bad = sum(r is None or row_hash(r) != h for r, h in zip(rows, saved["row_sha256"]))
        if bad:
            changed[name] = bad
        out[name] = [r for r in rows if r is not None]
    if changed:
        total = sum(changed.values())
        detail = ", ".join(f"{n} of {record['splits'][s]['count']} {s}" for s, n in changed.items())
        raise DataError(f"{file}: {total} row(s) differ from the data this run was trained on ({detail}; "
                        f"recorded in {path}). Results on it would not be the run's held-out results: restore "
                        f"the file the run trained on, or train a new run on this one.")
    return out


def read_record(path: str | Path, hint: str = "") -> dict[str, Any]:
    """splits.json as written by `save`, every field checked, or DamagedFile naming the file and what is wrong."""
    why = json_problem(path) if Path(path).is_file() else "it is missing"
    record = read_json(path) if why is None else None
    if record is not None:
        why = _record_problem(record)
    if why:
        raise DamagedFile(f"{path}: the run's saved split cannot be read: {why}. {hint}".rstrip())
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    if record.get("format") != FORMAT:
        return f"format {record.get('format')!r}, expected {FORMAT}"
    if not isinstance(record.get("source"), str) or not isinstance(record.get("splits"), dict):
        return "no 'source' or 'splits' field"
    for name, saved in record["splits"].items():
        rows, hashes = (saved.get("rows"), saved.get("row_sha256")) if isinstance(saved, dict) else (None, None)
        if not (isinstance(rows, list) and isinstance(hashes, list) and len(rows) == len(hashes)
                and all(isinstance(n, int) for n in rows) and isinstance(saved.get("count"), int)):
            return f"split {name!r} lacks matching 'rows', 'row_sha256' and 'count'"
        if "clustering" in record and not (isinstance(saved.get("row_cluster"), list)
                                           and len(saved["row_cluster"]) == len(rows)):
            return f"split {name!r} lacks a 'row_cluster' for each row, which its 'clustering' promises"
    if "clustering" in record and not (isinstance(record["clustering"], dict)
                                       and isinstance(record["clustering"].get("threshold"), (int, float))):
        return "'clustering' has no threshold"
    return None


def data_record(path: str | Path) -> dict[str, Any]:
    """The data's format and counts as training recorded them ({} for a record written before they were)."""
    return (read_json(path) or {}).get("data") or {}


def clustering(path: str | Path) -> dict[str, Any] | None:
    """How the saved split clustered near-duplicates; None for a split saved before near-duplicate clustering
    (it kept only identical prompts together, so its test rows may have paraphrases in train)."""
    return (read_json(path) or {}).get("clustering")


def grouping_label(clustering: dict[str, Any] | None) -> str:
    """What a saved split kept together, in words a report can print."""
    if clustering is None:
        return "identical questions only (saved before near-duplicate clustering)"
    return (f"near-duplicate clusters (word-set Jaccard >= {clustering['threshold']:g}, {clustering['method']}, "
            f"{clustering['num_perm']} permutations)")


def counts(path: str | Path) -> dict[str, int] | None:
    """Rows per split as recorded, without reading the data (the model card's data section)."""
    record = read_json(path)
    if record is None:
        return None
    return {name: s["count"] for name, s in record.get("splits", {}).items()}
