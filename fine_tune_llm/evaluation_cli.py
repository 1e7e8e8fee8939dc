"""`fine-tune-llm evaluate RUN_DIR`: base vs tuned on the held-out split."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `fine-tune-llm train` (its config, saved splits and adapter/)")
    p.add_argument("--split", default="test", choices=["test", "validation", "train"],
                   help="held-out test split by default: never trained on, never used to pick a checkpoint")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-generations", type=int, default=5, help="held-out questions answered by base and tuned")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--metrics-dir", default=None, help="where runs.csv gets its row (default: the run's metrics_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled generations and the bootstrap")


def run(args: argparse.Namespace) -> int:
    """Perplexity, bits per byte, preference accuracy and generations, base vs tuned; writes report.json/.md."""
    from .evaluation import evaluate_run

    report = evaluate_run(args.run_dir, split=args.split, batch_size=args.batch_size,
                          n_generations=args.n_generations, max_new_tokens=args.max_new_tokens,
                          metrics_dir=args.metrics_dir, seed=args.seed)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    rows = [("perplexity", "perplexity"), ("bits per byte", "bits_per_byte"),
            ("pref. accuracy (normalized)", "accuracy_normalized"), ("pref. accuracy (raw sum)", "accuracy_sum"),
            ("mean margin (nats/token)", "mean_margin")]
    lines = [(f"\n{report['run']}: {report['settings']['split']} split, {base['answers']} answers, "
             f"{base.get('pairs', 0)} pairs"), f"  {'':30s}{'base':>12s}{'tuned':>12s}"]
    lines += [f"  {label:30s}{base[key]:12.4f}{tuned[key]:12.4f}" for label, key in rows if key in base]
    if base.get("pairs"):
        lo, hi = tuned["margin_ci95"]
        lines.append(f"  tuned margin 95% CI: [{lo:.4f}, {hi:.4f}]")
    lines.append(f"  report: {report['run_dir']}/report.md")
    return "\n".join(lines)
