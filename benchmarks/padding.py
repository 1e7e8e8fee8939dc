"""How much of a padded batch is padding, per sampler: random batches against length-grouped ones.

    .venv/bin/python benchmarks/padding.py                         # SmolLM2-135M's tokenizer, 2,000 real training rows
    .venv/bin/python benchmarks/padding.py --model tiny --data-samples 40   # what the test runs

The CPU preset (smollm2-135m) pads each batch to its longest row (padding_free=False: packing made eager attention
score ~850 x 850 pairs per head). A padded position costs what a real one does in every matmul, so the share of
padded positions is the share of a training step's compute that is wasted. This counts it exactly, with the
samplers the Trainer builds (RandomSampler; transformers' LengthGroupedSampler for `group_by_length`), on the
package's own tokenized training split; no model is run. Writes metrics/bench_padding_cpu.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SMOL_GGUF, write_csv

COLUMNS = ["sampler", "batches", "real_tokens", "padded_tokens", "padding_share", "distinct_batch_lengths",
           "rows", "batch_size", "model"]


def padding_of(lengths: list[int], order: list[int], batch_size: int) -> dict[str, float]:
    """Real and padded positions when `order` is cut into batches, each padded to its longest row."""
    real = padded = 0
    widths = set()
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        width = max(batch)
        widths.add(width)
        real += sum(batch)
        padded += width * len(batch)
    return {"batches": -(-len(order) // batch_size), "real_tokens": real, "padded_tokens": padded,
            "padding_share": round(1 - real / padded, 4), "distinct_batch_lengths": len(widths)}


def orders(lengths: list[int], batch_size: int, seed: int) -> dict[str, list[int]]:
    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    return {"random": list(RandomSampler(range(len(lengths)), generator=generator)),
            "group_by_length": list(LengthGroupedSampler(batch_size, lengths=lengths,
                                                         generator=torch.Generator().manual_seed(seed)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOL_GGUF), help="a model path, or tiny (the tiny Gemma and the sample)")
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2500, help="rows kept: 80%% train (2,000 of 2,500)")
    p.add_argument("--out", default="metrics/bench_padding_cpu.csv")
    args = p.parse_args(argv)
    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.train.sft import prepare_data

    if args.model == "tiny":
        cfg = make_config("tiny", data_samples=args.data_samples)
    else:
        cfg = make_config("smollm2-135m", base_model=args.model, dataset=args.data, data_samples=args.data_samples)
    train = prepare_data(cfg, load_tokenizer(cfg)).tokenized["train"]
    lengths = [len(ids) for ids in train["input_ids"]]
    rows = [{"sampler": name, **padding_of(lengths, order, cfg.batch_size), "rows": len(lengths),
             "batch_size": cfg.batch_size, "model": Path(cfg.base_model).name}
            for name, order in orders(lengths, cfg.batch_size, cfg.seed).items()]
    write_csv(args.out, rows, COLUMNS)
    for r in rows:
        print(f"{r['sampler']:>16}: {r['padding_share']:.1%} of {r['padded_tokens']:,} positions are padding, "
              f"{r['distinct_batch_lengths']} distinct batch lengths")
    print(f"compute per epoch, group_by_length / random: {rows[1]['padded_tokens'] / rows[0]['padded_tokens']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
