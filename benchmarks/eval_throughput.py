"""Evaluation throughput: preference pairs scored per second, and peak memory, on the real data and model.

    .venv/bin/python benchmarks/eval_throughput.py                # 1,000 pairs (~10-15 min on 2 CPU cores)
    .venv/bin/python benchmarks/eval_throughput.py --pairs 50     # quick look

The model is the real small chat model in ../shared (SmolLM2-135M-Instruct, GGUF, loaded dequantized: transformers
cannot put bitsandbytes quantization on GGUF weights), the pairs the real psychology rows held out from training
(test split, then validation). Scoring is exactly what `fine-tune-llm evaluate` runs for one model:
eval.evaluate.score_model - the chosen answer of every pair (perplexity, bits per byte) and the rejected one
(preference accuracy, margin), float32 compute, batches of --batch-size. Measured: docs/results.md#evaluation.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SHARED, PeakMemory, machine

SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (evaluate uses float32 so numbers do not depend on the batch)")
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--data", default=str(REAL_DATA))
    args = p.parse_args(argv)
    for path in (args.model, args.data):
        if not Path(path).is_file():
            print(f"missing {path}: this benchmark needs ../shared (the real model and data)", file=sys.stderr)
            return 2

    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.eval.evaluate import load_for_eval, score_model

    cfg = make_config("smollm2-135m", base_model=args.model, dataset=args.data)
    splits = load_splits(cfg.dataset, cfg.seed, None, cfg.val_fraction, cfg.test_fraction)
    rows = [r for r in splits["test"] + splits["validation"] if r["rejected"]][:args.pairs]

    t0 = time.perf_counter()
    model, tokenizer = load_for_eval(cfg, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    rss_loaded = _max_rss_gb()

    wall0, cpu0 = time.perf_counter(), time.process_time()
    with PeakMemory() as mem:
        m = score_model(model, tokenizer, cfg, rows, batch_size=args.batch_size)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    n = m["pairs"]
    info = machine()
    print(f"\nevaluation throughput: {Path(args.model).name}, {args.dtype} compute, batch {args.batch_size}")
    print(f"  machine: {info['device']}, torch {info['torch']}, {info['threads']} threads, "
          f"load average {info['load_avg_1m']} (a shared CPU makes wall times noisy; CPU seconds are steadier)")
    print(f"  pairs: {n} held-out pairs = {2 * n} answers scored ({m['answer_tokens']:,} chosen-answer tokens)")
    print(f"  model load: {load_s:.1f} s; peak RSS after load {rss_loaded:.2f} GB")
    print(f"  scoring: {wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"  throughput: {n / wall:.2f} pairs/s ({2 * n / wall:.2f} answers/s); {cpu / n:.3f} CPU s per pair")
    print(f"  peak memory while scoring: {mem.peak_gb:.2f} GB; process peak RSS {_max_rss_gb():.2f} GB")
    lo, hi = m["margin_ci95"]
    print(f"  base model on these pairs: perplexity {m['perplexity']:.3f}, bits/byte {m['bits_per_byte']:.4f}, "
          f"preference accuracy normalized {m['accuracy_normalized']:.3f} / raw sum {m['accuracy_sum']:.3f} "
          f"(chosen is longer in {100 * m['chosen_longer']:.1f}%), mean margin {m['mean_margin']:.4f} "
          f"nats/token, 95% CI [{lo:.4f}, {hi:.4f}]")
    return 0


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


if __name__ == "__main__":
    sys.exit(main())
