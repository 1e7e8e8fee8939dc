"""lm-evaluation-harness against our scorer on a run's own held-out pairs: the same numbers, and what each costs.

    .venv/bin/python benchmarks/harness_check.py RUN_DIR              # every test pair, every column
    .venv/bin/python benchmarks/harness_check.py RUN_DIR --limit 20   # quick look

For each column of the run (base, SFT, SFT+preference) on the one model `evaluate` loads (released weights, float32
compute), the run's test split goes through `evaluate --tasks heldout_pairs` (eval/harness.py: each pair a two-choice
lm-eval task, answers as our scorer sees them) and through our scorer (eval/scoring.py). Printed and written to the
CSV per column: lm-eval's acc and ours (raw-sum preference accuracy), the largest difference between the two
per-pair log-likelihood margins, the pairs whose sign differs, and the wall and CPU seconds of each. The harness
task is written into RUN_DIR/harness/: pass a copy of a run you do not own. Measured: docs/results.md#evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine, write_csv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--limit", type=int, default=None, help="the first N test pairs only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(REPO / "metrics" / "bench_harness_smollm2.csv"))
    args = p.parse_args(argv)

    import torch

    from fine_tune_llm.eval import harness, scoring
    from fine_tune_llm.eval.evaluate import eval_rows, load_columns
    from fine_tune_llm.manifest import git_state
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.run import RunDir

    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunDir.of(args.run_dir)
    cfg = run.read_config()
    tokenizer = load_tokenizer(cfg)
    rows = eval_rows(run, "test")
    plan = harness.plan(run, cfg, tokenizer, rows, "heldout_pairs")
    kept = {r.get("row") for r in _items(plan)}
    pairs = [r for r in rows if r.get("rejected") and r.get("row") in kept][:args.limit]
    columns = load_columns(run, cfg)
    raw = harness.run_harness(plan, columns, cfg, args.limit, args.batch_size)
    info, commit = machine(), git_state().get("commit")
    out = []
    for name in columns.names:
        samples = sorted(raw[name]["results"]["samples"][harness.PAIRS_TASK], key=lambda s: s["doc_id"])
        theirs = [s["filtered_resps"][0][0] - s["filtered_resps"][1][0] for s in samples]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with columns.use(name) as model:
            ours_m, m = _our_margins(model, tokenizer, cfg, pairs, args.batch_size, scoring)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        result = raw[name]["results"]["results"][harness.PAIRS_TASK]
        diffs = [abs(a - b) for a, b in zip(theirs, ours_m)]
        out.append({
            "column": columns.labels[name], "pairs": len(pairs), "lm_eval_pairs": len(theirs),
            "lm_eval_acc": result["acc,none"], "lm_eval_acc_stderr": result["acc_stderr,none"],
            "ours_accuracy_sum": m["accuracy_sum"], "ours_accuracy_normalized": m["accuracy_normalized"],
            "max_abs_margin_diff": max(diffs), "sign_disagreements": sum((a > 0) != (b > 0)
                                                                          for a, b in zip(theirs, ours_m)),
            "lm_eval_wall_s": round(raw[name]["seconds"], 1), "lm_eval_cpu_s": round(raw[name]["cpu_seconds"], 1),
            "ours_wall_s": round(wall, 1), "ours_cpu_s": round(cpu, 1), "threads": torch.get_num_threads(),
            "device": info["device"], "load_avg_1m": info["load_avg_1m"], "git_commit": commit,
            "date": datetime.now(timezone.utc).date().isoformat(),
        })
    _print(out, run, info)
    print(f"  written: {write_csv(args.out, out)}")
    return 0


def _items(plan) -> list[dict]:
    import json

    data = Path(plan.pairs["file"]).with_suffix(".jsonl")
    return [json.loads(line) for line in data.read_text().splitlines()]


def _our_margins(model, tokenizer, cfg, pairs, batch_size, scoring):
    """Per-pair summed log-likelihood margin (chosen - rejected) and the preference metrics, as evaluate runs them."""
    q = [r["question"] for r in pairs]
    chosen = scoring.score_answers(model, tokenizer, q, [r["answer"] for r in pairs], cfg.max_length,
                                   cfg.system_prompt, batch_size, progress=False)
    rejected = scoring.score_answers(model, tokenizer, q, [r["rejected"] for r in pairs], cfg.max_length,
                                     cfg.system_prompt, batch_size, progress=False)
    margins = [k - j for j, k in zip(chosen.nats, rejected.nats)]
    return margins, scoring.preference_metrics((chosen.nats, chosen.tokens), (rejected.nats, rejected.tokens))


def _print(out: list[dict], run, info: dict) -> None:
    print(f"\nlm-evaluation-harness vs our scorer on {run.name}'s held-out pairs ({out[0]['pairs']} pairs)")
    print(f"  machine: {info['device']}, {info['threads']} threads, load average {info['load_avg_1m']}")
    print(f"  {'column':10s}{'lm-eval acc':>14s}{'ours (sum)':>12s}{'ours (norm)':>12s}{'max |dm|':>10s}"
          f"{'signs':>7s}{'lm-eval s':>11s}{'ours s':>9s}")
    for r in out:
        print(f"  {r['column']:10s}{r['lm_eval_acc']:14.4f}{r['ours_accuracy_sum']:12.4f}"
              f"{r['ours_accuracy_normalized']:12.4f}{r['max_abs_margin_diff']:10.5f}{r['sign_disagreements']:7d}"
              f"{r['lm_eval_wall_s']:11.1f}{r['ours_wall_s']:9.1f}")


if __name__ == "__main__":
    sys.exit(main())
