"""Warm data preparation per data format: load + check + dedupe + split, then template + tokenize every split, of
the real psychology parquet (question-response rows) and the real chatterbot conversations (messages, multi-turn),
with gemma-2b-it's tokenizer. Best of --repeats in one process; a file the code cannot read is recorded as refused.

    python benchmarks/data_prep.py                                   # this checkout
    PYTHONPATH=../other-checkout python benchmarks/data_prep.py --code before --append   # another version, A/B

Writes metrics/bench_data_prep_formats_cpu.csv (one row per code version and file); results: docs/results.md
("Data preparation").
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from common import GEMMA_TOKENIZER, REAL_DATA, REPO, SHARED, cpu_description, load_average, write_csv

CHATTERBOT = SHARED / "data" / "chatterbot-corpus" / "english_messages.jsonl"
COLUMNS = ["code", "data", "rows", "load_split_s", "tokenize_s", "load_average", "device"]


def measure(path: Path, tokenizer, repeats: int) -> dict:
    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.errors import DataError

    try:
        from fine_tune_llm.data.tokenized import tokenize_split
    except ImportError:  # the code before conversations kept it in train.sft
        from fine_tune_llm.train.sft import tokenize_split

    cfg = make_config("gemma-2b-it", dataset=str(path))
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            splits = load_splits(cfg.dataset, cfg.seed, None, cfg.val_fraction, cfg.test_fraction)
        except DataError as exc:
            return {"rows": f"refused: {str(exc)[len(str(path)) + 2:][:60]}"}
        t1 = time.perf_counter()
        rows = sum(len(tokenize_split(part, tokenizer, cfg, name)) for name, part in splits.items())
        t2 = time.perf_counter()
        if best is None or (t2 - t0) < best["load_split_s"] + best["tokenize_s"]:
            best = {"rows": rows, "load_split_s": round(t1 - t0, 3), "tokenize_s": round(t2 - t1, 3)}
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", default="this checkout", help="label of the code version measured")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--append", action="store_true", help="add rows to the CSV instead of replacing it")
    p.add_argument("--out", default=str(REPO / "metrics" / "bench_data_prep_formats_cpu.csv"))
    a = p.parse_args()
    logging.disable(logging.WARNING)  # cut and skip counts are not what is measured here
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GEMMA_TOKENIZER)
    rows = []
    for path in (REAL_DATA, CHATTERBOT):
        row = {"code": a.code, "data": path.name, **measure(path, tokenizer, a.repeats),
               "load_average": round(load_average(), 1), "device": cpu_description()}
        print(row)
        rows.append(row)
    print(f"wrote {write_csv(a.out, rows, COLUMNS, append=a.append)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
