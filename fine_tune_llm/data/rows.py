"""Load a dataset, check every row, shuffle with the seed, and split by question without leaks.

Two schemas are accepted:
- preference rows: question, response_j (trained on), response_k (kept for evaluation only);
- instruction rows: instruction, input (optional), output - the usual layout for other domains.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)

SAMPLE_DATA = Path(__file__).parent / "assets" / "sample_psychology.jsonl"
PREFERENCE = ("question", "response_j", "response_k")
INSTRUCTION = ("instruction", "input", "output")
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


def detect_schema(rows: list[dict[str, Any]], source: str) -> str:
    columns = set(rows[0]) if rows else set()
    if {"question", "response_j"} <= columns:
        return "preference"
    if {"instruction", "output"} <= columns:
        return "instruction"
    want_p = [c for c in ("question", "response_j") if c not in columns]
    raise DataError(f"{source}: missing column(s) {', '.join(want_p)}; expected (question, response_j, response_k) "
                    f"or (instruction, input, output); found: {', '.join(sorted(columns)) or 'no columns'}")


def _text(row: dict[str, Any], column: str, n: int, source: str, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if not required:
            return None
        raise DataError(f"{source}: row {n}, column {column!r}: value is null")
    if not isinstance(value, str):
        raise DataError(f"{source}: row {n}, column {column!r}: expected text, got {type(value).__name__} "
                        f"{str(value)[:40]!r}")
    if required and not value.strip():
        raise DataError(f"{source}: row {n}, column {column!r}: text is empty")
    return value


def to_examples(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Check every row; return {row, question, answer, rejected} with the file's 1-based row number."""
    if not rows:
        raise DataError(f"{source}: no rows")
    schema = detect_schema(rows, source)
    examples, blank = [], []
    for n, row in enumerate(rows, start=1):
        if _is_blank(row):  # e.g. a spreadsheet's trailing line of spaces: nothing to train on or report
            blank.append(n)
            continue
        if schema == "preference":
            question = _text(row, "question", n, source)
            answer = _text(row, "response_j", n, source)
            rejected = _text(row, "response_k", n, source, required="response_k" in row)
        else:
            question = _text(row, "instruction", n, source)
            extra = _text(row, "input", n, source, required=False)
            if extra and extra.strip():
                question = f"{question}\n\n{extra}"
            answer = _text(row, "output", n, source)
            rejected = None
        examples.append({"row": n, "question": question, "answer": answer, "rejected": rejected})
    if blank:
        log.warning("%s: skipped %d blank row(s) (every column empty or whitespace: rows %s)", source, len(blank),
                    ", ".join(map(str, blank[:10])))
    if not examples:
        raise DataError(f"{source}: every row is blank")
    return examples


def check_pairs(examples: list[dict[str, Any]], source: str) -> None:
    """A preference stage needs a rejected answer that is real text and differs from the chosen one."""
    for ex in examples:
        rejected = ex.get("rejected")
        where = f"{source}: row {ex['row']}, column 'response_k'"
        if rejected is None:
            raise DataError(f"{source}: row {ex['row']} has no rejected answer: the preference stage needs pairs "
                            f"(question, response_j, response_k); instruction rows (instruction, input, output) "
                            f"train with the default SFT stage only")
        if not rejected.strip():
            raise DataError(f"{where}: the rejected answer is empty or whitespace")
        if rejected.strip() == ex["answer"].strip():
            raise DataError(f"{where}: the rejected answer is identical to the chosen one (response_j): the pair "
                            f"teaches nothing; drop the row or fix it")


def _is_blank(row: dict[str, Any]) -> bool:
    return all(v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
               for v in row.values())


def drop_duplicates(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, kept = set(), []
    for ex in examples:
        key = (normalize_question(ex["question"]), ex["answer"].strip())
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    if len(kept) < len(examples):
        log.info("dropped %d duplicate row(s) (same question and answer)", len(examples) - len(kept))
    return kept


def normalize_question(text: str) -> str:
    """Case, punctuation and spacing do not make a new question."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def split_by_question(examples: list[dict[str, Any]], val_fraction: float, test_fraction: float,
                      ) -> dict[str, list[dict[str, Any]]]:
    """Whole question groups go to one split, so no question is in two splits."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(normalize_question(ex["question"]), []).append(ex)
    total = len(examples)
    want = {"test": test_fraction * total, "validation": val_fraction * total}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for members in groups.values():  # insertion order = shuffled order: a random, seeded assignment
        name = next((s for s in ("test", "validation") if len(splits[s]) < want[s]), "train")
        splits[name].extend(members)
    return splits


def load_examples(source: str | Path) -> list[dict[str, Any]]:
    """Every checked row of the source, in file order, each with its 1-based row number."""
    src = resolve_source(str(source))
    return to_examples(read_rows(src), src)


def load_splits(source: str, seed: int, data_samples: int | None = None, val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """Read, check, dedupe, shuffle with the seed, keep the first data_samples rows, split by question."""
    examples = drop_duplicates(load_examples(source))
    random.Random(seed).shuffle(examples)
    if data_samples is not None:
        examples = examples[:data_samples]
    splits = split_by_question(examples, val_fraction, test_fraction)
    log.info("data %s: %s", source, ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
    return splits
