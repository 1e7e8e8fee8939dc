"""Examples -> the tokenized dataset training reads, with what was cut or skipped counted, and what to show of it.

One encoder serves training, evaluation and the preference stage (chat_template.encode_conversations), so the
tokens a run learns are exactly the tokens it is scored on.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import TrainConfig
from .chat_template import encode_conversations, with_system
from .formats import conversation

log = logging.getLogger(__name__)
COLUMNS = ("row", "question", "answer", "input_ids", "completion_mask", "status", "turns", "turns_kept",
           "turns_trained", "full_length")


def turns_of(example: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation an example is trained on: its turns, with the configured system prompt where it has none."""
    return with_system(conversation(example), system_prompt)


def encode_examples(tokenizer, examples: list[dict[str, Any]], max_length: int, system_prompt: str | None = None,
                    train_on: str = "all") -> dict[str, list[Any]]:
    """encode_conversations over examples: the same ids and masks wherever a row is trained or scored."""
    return encode_conversations(tokenizer, [turns_of(ex, system_prompt) for ex in examples], max_length, train_on,
                                rows=[ex["row"] for ex in examples])


def tokenize_split(rows: list[dict[str, Any]], tokenizer, cfg: TrainConfig, name: str = "split"):
    """A datasets.Dataset with input_ids and completion_mask (and each row's number, question, answer, status and
    turn counts); rows whose first answer has no room in max_length dropped, and every cut counted in the log."""
    from datasets import Dataset

    enc = encode_examples(tokenizer, rows, cfg.max_length, cfg.system_prompt, cfg.train_on)
    columns = {"row": [r["row"] for r in rows], "question": [r["question"] for r in rows],
               "answer": [r["answer"] for r in rows], **{k: enc[k] for k in COLUMNS if k in enc}}
    ds = Dataset.from_dict(columns)
    if len(ds) == 0:
        return ds
    report_cuts(name, enc, [r["row"] for r in rows], cfg.max_length)
    if "too_long" in enc["status"]:
        ds = ds.filter(lambda s: s != "too_long", input_columns="status")
    return ds


def report_cuts(name: str, enc: dict[str, list[Any]], rows: list[int], max_length: int) -> None:
    status = enc["status"]
    too_long = [r for r, s in zip(rows, status) if s == "too_long"]
    n_trunc = status.count("truncated")
    cut = [(r, t - k) for r, s, t, k in zip(rows, status, enc["turns"], enc["turns_kept"]) if s == "cut"]
    if too_long:
        log.warning("%s: skipped %d row(s) that do not fit max_length=%d: the prompt alone fills it, or a "
                    "conversation's first answer does not fit (rows %s)", name, len(too_long),
                    max_length, ", ".join(map(str, too_long[:10])))
    if n_trunc:
        log.warning("%s: %d answer(s) truncated at max_length=%d", name, n_trunc, max_length)
    if cut:
        log.warning("%s: %d conversation(s) cut at a turn boundary to fit max_length=%d, %d later assistant turn(s) "
                    "dropped (rows %s)", name, len(cut), max_length, sum(d for _, d in cut),
                    ", ".join(str(r) for r, _ in cut[:10]))


def length_summary(ds) -> dict[str, Any]:
    """Rows kept, cut, truncated; percentiles of each whole conversation's length in tokens; trained tokens."""
    import numpy as np

    if len(ds) == 0:
        return {"rows": 0}
    full = np.asarray(ds["full_length"])
    status = ds["status"]
    return {"rows": len(ds), "truncated": status.count("truncated"), "cut": status.count("cut"),
            "turns_dropped": int(sum(t - k for t, k in zip(ds["turns"], ds["turns_kept"]))),
            **{f"p{q}": int(np.percentile(full, q)) for q in (50, 90, 99)}, "max": int(full.max()),
            "trained_tokens": int(sum(map(sum, ds["completion_mask"])))}


def pick_example(ds, row: int | None = None) -> int:
    """Which tokenized row to show: the given file row, else a multi-turn one (two or three answers trained, the
    shortest such), else the first."""
    rows = ds["row"]
    if row is not None:
        if row not in rows:
            raise ValueError(f"row {row} is not in this split (it may be in another, a dropped duplicate, or skipped "
                             f"because its prompt fills max_length)")
        return rows.index(row)
    trained, lengths = ds["turns_trained"], [len(ids) for ids in ds["input_ids"]]
    multi = [i for i, t in enumerate(trained) if t >= 2]
    if not multi:
        return 0
    return min(multi, key=lambda i: (-min(trained[i], 3), lengths[i]))
