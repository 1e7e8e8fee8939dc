"""Load a dataset, check every row, shuffle with the seed, and split by near-duplicate cluster without leaks.

The formats a file may come in (conversations, prompt/completion, preference rows, instruction rows, your own
column names) and what each row becomes are in formats.py; here rows are read, deduplicated and split so that
rows of one cluster (the same or a near-duplicate question or user turns, clusters.py) never straddle two splits.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import DataError
from . import formats
from .clusters import GROUP_KEY, cluster_labels, describe_leakage, group_key, leakage_levels, settings

log = logging.getLogger(__name__)

SAMPLE_DATA = Path(__file__).parent / "assets" / "sample_psychology.jsonl"
FORMATS = (".parquet", ".csv", ".jsonl", ".json")


def resolve_source(source: str) -> str:
    return str(SAMPLE_DATA) if source == "sample" else source


def read_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows as dicts, from the Hub or a local file. Errors name the file and line."""
    source = resolve_source(str(source))
    path = Path(source).expanduser()
    # A Hub id is "owner/name"; a name without a slash but with an extension is a file the user meant.
    looks_like_file = bool(path.suffix) and "/" not in source
    if path.suffix.lower() in FORMATS or path.exists() or looks_like_file or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    return _read_hub(source)


def _read_hub(dataset_id: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train").to_list()
    except Exception as exc:  # noqa: BLE001 - connection, auth and not-found errors all end the same way for the user
        raise DataError(f"could not load dataset {dataset_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
                        f"{str(exc)[:200]}). Offline? Pass a local .parquet/.csv/.jsonl file, or use "
                        f"`--preset tiny` which ships its data.") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict("records")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged or mislabelled file
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    # The csv module refuses fields over 128 KiB by default; a very long row is the tokenizer's business
    # (it is skipped or truncated there, with a count in the log), not a crash here.
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(io.StringIO("\n".join(_decode_lines(path)) + "\n"))
    try:
        return list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None


def _decode_lines(path: Path) -> list[str]:
    """Decode line by line: a file that mixes UTF-8 with cp1252 (Excel exports) still loads."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (Windows "Unicode")
        return data.decode("utf-16").splitlines()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM would otherwise glue itself to the first column name
        data = data[3:]
    lines, fallback = [], []
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
            fallback.append(n)
    if fallback:
        log.warning("%s: %d line(s) were not UTF-8 and were read as cp1252 (lines %s)", path, len(fallback),
                    ", ".join(map(str, fallback[:10])))
    return lines


def _read_json(path: Path) -> list[dict[str, Any]]:
    lines = _decode_lines(path)
    text = "\n".join(lines).lstrip()
    if path.suffix.lower() == ".json" and text.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    else:
        rows = []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n} is a {type(row).__name__}, not an object with named columns")
    return rows


def to_examples(rows: list[dict[str, Any]], source: str, data_format: str = "auto",
                columns: str | dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Check every row; return {row, question, answer, rejected} (+ messages for a conversation) per row, with the
    file's 1-based row number (data/formats.py says what each format holds)."""
    return read_examples(rows, source, data_format, columns)[0]


def read_examples(rows: list[dict[str, Any]], source: str, data_format: str = "auto",
                  columns: str | dict[str, str] | None = None) -> tuple[list[dict[str, Any]], formats.DataFormat]:
    """The checked examples and the format they were read in."""
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = formats.choose(rows, source, data_format, columns)
    examples, blank, trailing = [], [], []
    for n, row in enumerate(rows, start=1):
        if _is_blank(row):  # e.g. a spreadsheet's trailing line of spaces: nothing to train on or report
            blank.append(n)
            continue
        example, dropped = formats.read_row(row, n, source, fmt)
        examples.append(example)
        if dropped:
            trailing.append(n)
    if blank:
        log.warning("%s: skipped %d blank row(s) (every column empty or whitespace: rows %s)", source, len(blank),
                    ", ".join(map(str, blank[:10])))
    if trailing:
        log.info("%s: dropped the final user turn of %d conversation(s): no answer follows it (rows %s)", source,
                 len(trailing), ", ".join(map(str, trailing[:10])))
    if not examples:
        raise DataError(f"{source}: every row is blank")
    return examples, fmt


def check_pairs(examples: list[dict[str, Any]], source: str, fmt: formats.DataFormat | None = None) -> None:
    """A preference stage needs a rejected answer that is real text and differs from the chosen one."""
    column = (fmt.rejected_column if fmt is not None else None) or "response_k"
    for ex in examples:
        rejected = ex.get("rejected")
        where = f"{source}: row {ex['row']}, column {column!r}"
        if rejected is None:
            raise DataError(f"{source}: row {ex['row']} has no rejected answer: the preference stage needs pairs; "
                            f"{no_pairs_reason(fmt)}")
        if not rejected.strip():
            raise DataError(f"{where}: the rejected answer is empty or whitespace")
        if rejected.strip() == ex["answer"].strip():
            raise DataError(f"{where}: the rejected answer is identical to the chosen one: the pair teaches "
                            f"nothing; drop the row or fix it")


def no_pairs_reason(fmt: formats.DataFormat | None) -> str:
    """Why rows have no rejected answer, and which rows would."""
    what = f"{without_rejected(fmt)}; " if fmt is not None else ""
    return (f"{what}rows with a rejected answer are (question, response_j, response_k), (prompt, chosen, rejected), "
            f"messages or conversations with a rejected column, or --columns ...,rejected=COLUMN; instruction and "
            f"prompt-completion rows train with the default SFT stage only")


def without_rejected(fmt: formats.DataFormat) -> str:
    column = fmt.rejected_column
    return (f"the data is read as format {fmt.name!r} ({fmt.how}), "
            + (f"without a {column!r} column" if column else "which has no rejected answers"))


def _is_blank(row: dict[str, Any]) -> bool:
    return all(v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
               for v in row.values())


def drop_duplicates(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same prompt (group key and system message) and the same answers: one is kept."""
    seen, kept = set(), []
    for ex in examples:
        answers = tuple(m["content"].strip() for m in formats.conversation(ex) if m["role"] == "assistant")
        key = (group_key(ex), formats.system_message(ex), answers)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    if len(kept) < len(examples):
        log.info("dropped %d duplicate row(s) (same prompt and answers)", len(examples) - len(kept))
    return kept


def split_by_question(examples: list[dict[str, Any]], val_fraction: float, test_fraction: float,
                      labels: list[str], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Whole clusters (rows with one label, see clusters.py) go to one split, so no question, conversation or
    paraphrase of one is in two splits. The clusters are taken in a seeded random order, each as likely as any
    other to be held out: in the rows' order a large cluster would almost always come first, into the test split."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for ex, label in zip(examples, labels, strict=True):
        groups.setdefault(label, []).append(ex)
    order = sorted(groups)  # the labels' own order, then the seed's: the same clusters, the same assignment
    random.Random(seed).shuffle(order)
    total = len(examples)
    want = {"test": test_fraction * total, "validation": val_fraction * total}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for label in order:
        name = next((s for s in ("test", "validation") if len(splits[s]) < want[s]), "train")
        splits[name].extend(groups[label])
    rank = {id(ex): i for i, ex in enumerate(examples)}
    for part in splits.values():  # within a split, the rows' shuffled order, as before
        part.sort(key=lambda ex: rank[id(ex)])
    return splits


class Splits(dict):
    """split name -> rows; `summary`: the data's format and counts (recorded in splits.json, printed);
    `clustering`: how near-duplicate prompts were clustered (None: a split saved before near-duplicate clustering,
    which kept only identical prompts together); `clusters`: each row's cluster label by row number."""

    def __init__(self, parts: dict[str, list[dict[str, Any]]], summary: dict[str, Any] | None = None,
                 clustering: dict[str, Any] | None = None, clusters: dict[int, str] | None = None):
        super().__init__(parts)
        self.summary = summary or {}
        self.clustering = clustering
        self.clusters = clusters or {}


def load_examples(source: str | Path, data_format: str = "auto",
                  columns: str | dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every checked row of the source, in file order, each with its 1-based row number."""
    src = resolve_source(str(source))
    return to_examples(read_rows(src), src, data_format, columns)


def load_splits(source: str, seed: int, data_samples: int | None = None, val_fraction: float = 0.1,
                test_fraction: float = 0.1, data_format: str = "auto",
                columns: str | dict[str, str] | None = None,
                near_duplicate_threshold: float = TrainConfig.near_duplicate_threshold) -> Splits:
    """Read, check, dedupe, shuffle with the seed, keep the first data_samples rows, split by near-duplicate
    cluster (clusters.py), and measure the near-twins left between train and test."""
    src = resolve_source(str(source))
    examples, fmt = read_examples(read_rows(src), src, data_format, columns)
    read = len(examples)
    examples = drop_duplicates(examples)
    deduped = len(examples)
    random.Random(seed).shuffle(examples)
    if data_samples is not None:
        examples = examples[:data_samples]
    labels = cluster_labels(examples, near_duplicate_threshold)
    splits = Splits(split_by_question(examples, val_fraction, test_fraction, labels=labels, seed=seed),
                    clustering=cluster_record(labels, near_duplicate_threshold),
                    clusters={ex["row"]: label for ex, label in zip(examples, labels)})
    splits.summary = summarize(splits, fmt, rows_read=read, duplicates=read - deduped)
    splits.summary["leakage"] = leakage_levels(splits["train"], splits["test"], near_duplicate_threshold)
    warn_overfull(splits, {"validation": val_fraction, "test": test_fraction}, near_duplicate_threshold)
    log.info("data %s: %s", source, describe(splits.summary))
    return splits


def warn_overfull(splits: Splits, fractions: dict[str, float], threshold: float) -> None:
    """A cluster larger than a held-out split's share makes that share unreachable: say so, and what to change."""
    total = sum(len(rows) for rows in splits.values())
    for name, fraction in fractions.items():
        if total and len(splits[name]) > 1.5 * fraction * total + 1:
            log.warning("the %s split holds %d of %d rows, not the %.0f%% asked for: a near-duplicate cluster of "
                        "up to %d rows went there whole; a higher near_duplicate_threshold (now %g) makes smaller "
                        "clusters", name, len(splits[name]), total, 100 * fraction,
                        splits.clustering["largest_cluster"], threshold)


def config_splits(cfg: TrainConfig) -> Splits:
    """The configured data, read, checked and split: what training saves into its run (splits.json) and
    `fine-tune-llm data` previews. Every later stage reads the run's saved split instead."""
    return load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction, cfg.data_format,
                       cfg.columns, cfg.near_duplicate_threshold)


def cluster_record(labels: list[str], threshold: float) -> dict[str, Any]:
    """The clustering's settings, how many clusters it made and the largest one's rows (splits.json records it)."""
    sizes = Counter(labels)
    return {**settings(threshold), "clusters": len(sizes), "largest_cluster": max(sizes.values(), default=0)}


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows, prompt groups, multi-turn conversations, assistant turns and rows with a rejected answer."""
    return {"rows": len(rows), "groups": len({group_key(r) for r in rows}),
            "multi_turn": sum(formats.assistant_turns(r) > 1 for r in rows),
            "assistant_turns": sum(formats.assistant_turns(r) for r in rows),
            "with_rejected": sum(r.get("rejected") is not None for r in rows)}


def summarize(splits: dict[str, list[dict[str, Any]]], fmt: formats.DataFormat, rows_read: int,
              duplicates: int) -> dict[str, Any]:
    """What splits.json records and `fine-tune-llm data` prints about the data."""
    every = [r for rows in splits.values() for r in rows]
    return {**fmt.record(), "rows_read": rows_read, "duplicates_dropped": duplicates, **counts(every),
            "group_key": GROUP_KEY, "splits": {name: counts(rows) for name, rows in splits.items()}}


def describe(summary: dict[str, Any]) -> str:
    """One line: the format, how it was chosen, rows and turns, and rows per split."""
    per_split = ", ".join(f"{k}={v['rows']}" for k, v in summary["splits"].items())
    return (f"format {summary['format']} ({summary['chosen_by']}); {summary['rows']:,} rows "
            f"({summary['multi_turn']:,} multi-turn, {summary['assistant_turns']:,} assistant turns, "
            f"{summary['with_rejected']:,} with a rejected answer); {per_split}"
            + (f"; {describe_leakage(summary['leakage'])}" if "leakage" in summary else ""))
