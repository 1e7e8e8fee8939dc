"""`fine-tune-llm data [FILE]`: what training would read and learn from a data file, without loading a model.

The format (detected or forced) and how many rows, conversations and turns it holds; the split by near-duplicate
cluster and how many test questions keep a near-twin in train; token
lengths with the preset's tokenizer and max_length, and how many rows would be truncated, cut or skipped; and one
row with exactly its trained tokens marked.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config import PRESETS, TrainConfig, add_config_arguments, field_names, make_config
from ..errors import EnvironmentNotReady

SPLITS = ("train", "validation", "test")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a .parquet, .csv, .jsonl or .json file, or a Hub dataset id "
                                           "(default: the preset's dataset)")
    p.add_argument("--preset", default="gemma-2b-it", choices=list(PRESETS),
                   help="whose tokenizer, template, max_length and split settings to use (as `train` would)")
    p.add_argument("--config", help="YAML file of option: value, applied over the preset (flags win over it)")
    p.add_argument("--row", type=int, help="show this row (its 1-based number in the file) instead of a multi-turn "
                                           "one from the train split")
    add_config_arguments(p.add_argument_group("training options (the ones that shape the data: --data-format, "
                                              "--columns, --train-on, --max-length, --system-prompt, ...)"))


def run(args: argparse.Namespace) -> int:
    """Show the detected format, rows and turns per split, token lengths, cuts and one row's trained tokens."""
    overrides = {name: getattr(args, name) for name in field_names() if name != "preset" and hasattr(args, name)}
    if args.file:
        overrides["dataset"] = args.file
    cfg = make_config(args.preset, args.config, **overrides)
    print(report(cfg, args.row))
    return 0


def report(cfg: TrainConfig, row: int | None = None) -> str:
    from ..data.clusters import describe_leakage
    from ..data.rows import config_splits
    from ..data.splits import grouping_label
    from ..data.tokenized import length_summary, tokenize_split
    from ..notebook import display

    # The counts the log would give are in the summary below; warnings about the file itself (blank rows, odd
    # encodings) still show.
    quiet = logging.getLogger("fine_tune_llm.data")
    level = quiet.level
    try:
        quiet.setLevel(logging.WARNING)
        splits = config_splits(cfg)  # every row read and checked first: a bad row stops before any tokenizer loads
        tokenizer = tokenizer_for(cfg)
        quiet.setLevel(logging.ERROR)  # truncated, cut and skipped rows are counted in the table
        tokenized = {name: tokenize_split(splits[name], tokenizer, cfg, name) for name in SPLITS}
    finally:
        quiet.setLevel(level)
    s = splits.summary
    lines = [f"data: {cfg.dataset}", f"format: {s['format']} ({s['chosen_by']})"
             + (f", columns {s['columns']}" if s.get("columns") else ""),
             (f"rows: {s['rows_read']:,} read, {s['duplicates_dropped']:,} duplicate(s) dropped, {s['rows']:,} kept"
              + (f" (data_samples={cfg.data_samples})" if cfg.data_samples else "")
              + f": {s['multi_turn']:,} multi-turn, {s['assistant_turns']:,} assistant turns, "
              f"{s['with_rejected']:,} with a rejected answer"),
             "", (f"split by {grouping_label(splits.clustering)}: {splits.clustering['clusters']:,} clusters, the "
                  f"largest {splits.clustering['largest_cluster']:,} rows:"), _counts_table(s["splits"]),
             f"  {describe_leakage(s['leakage'])}", "",
             (f"tokens ({cfg.base_model}'s chat template, max_length {cfg.max_length}, training on "
              f"{'the final assistant turn' if cfg.train_on == 'last' else 'every assistant turn'}; lengths are "
              f"whole conversations, before any cut):"),
             _length_table({n: (len(splits[n]), length_summary(tokenized[n])) for n in SPLITS}), ""]
    name, ds, index = _shown_row(tokenized, row)
    trained = ds[index]["turns_trained"]
    lines.append(f"row {ds[index]['row']} ({name} split, {ds[index]['turns']} assistant turn(s), {trained} trained, "
                 f"status {ds[index]['status']}); trained tokens between [[ and ]]:")
    lines.append(str(display.masked_view(tokenizer, ds[index]["input_ids"], ds[index]["completion_mask"])))
    return "\n".join(lines)


def tokenizer_for(cfg: TrainConfig):
    """The model's tokenizer (no weights), with one message when it can only come from an unreachable Hub."""
    from ..model.hardware import check_model_reachable
    from ..model.loading import load_tokenizer

    try:
        check_model_reachable(cfg)
    except EnvironmentNotReady as exc:
        raise EnvironmentNotReady(f"{exc} A local tokenizer works too: --base-model DIR (a folder with the tokenizer "
                                  f"files) or a .gguf file.") from None
    return load_tokenizer(cfg)


def _shown_row(tokenized: dict[str, Any], row: int | None):
    from ..data.tokenized import pick_example

    if row is None:
        for name in SPLITS:
            if len(tokenized[name]):
                return name, tokenized[name], pick_example(tokenized[name])
    for name in SPLITS:
        if row in tokenized[name]["row"]:
            return name, tokenized[name], pick_example(tokenized[name], row)
    from ..errors import DataError

    raise DataError(f"row {row} is in no split after tokenizing (a duplicate dropped, beyond --data-samples, or "
                    f"skipped because its prompt fills max_length)")


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    head = f"  {'':12s}{'rows':>8s}{'groups':>8s}{'multi-turn':>12s}{'assistant turns':>17s}{'with rejected':>15s}"
    body = [f"  {n:12s}{c['rows']:8,d}{c['groups']:8,d}{c['multi_turn']:12,d}{c['assistant_turns']:17,d}"
            f"{c['with_rejected']:15,d}" for n, c in counts.items()]
    return "\n".join([head, *body])


def _length_table(stats: dict[str, tuple[int, dict[str, Any]]]) -> str:
    head = (f"  {'':12s}{'rows':>7s}{'skipped':>9s}{'truncated':>11s}{'cut (turns dropped)':>21s}"
            f"{'p50':>7s}{'p90':>7s}{'p99':>7s}{'max':>7s}{'trained tokens':>16s}")
    body = []
    for name, (total, s) in stats.items():
        if not s["rows"]:
            body.append(f"  {name:12s}{total:7,d}{total:9,d}")
            continue
        cut = f"{s['cut']} ({s['turns_dropped']})"
        body.append(f"  {name:12s}{total:7,d}{total - s['rows']:9,d}{s['truncated']:11,d}{cut:>21s}{s['p50']:7,d}"
                    f"{s['p90']:7,d}{s['p99']:7,d}{s['max']:7,d}{s['trained_tokens']:16,d}")
    return "\n".join([head, *body])
