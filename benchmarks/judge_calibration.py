"""Calibrate a pairwise judge on real held-out psychology pairs: agreement with the labels, raw and length-matched.

    .venv/bin/python benchmarks/judge_calibration.py                      # 100 pairs, SmolLM2 GGUF through llama.cpp
    .venv/bin/python benchmarks/judge_calibration.py --pairs 20           # quick look
    .venv/bin/python benchmarks/judge_calibration.py --backend transformers   # the same GGUF through transformers

The judge is SmolLM2-135M-Instruct (the Q4_1 GGUF in ../shared) asked eval/judge.py's psychology rubric; the pairs
are the real psychology rows held out from training (the test split the default seed makes, one pair per question),
(response_j, response_k) as (chosen, rejected). eval.judge.calibrate asks each pair in both orders, as given and with
both answers cut to equal length. `--cross-check N` also asks the other backend the first N pairs' prompts and prints
the largest difference in p("A") between the two runtimes (same weights: it should be small). Printed and appended to
the CSV: agreement raw and length-matched with 95% CIs, position bias, order consistency, the verdict, and the wall
and CPU seconds. Measured: docs/results.md#a-small-judge-on-the-psychology-pairs.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, REPO, SMOL_GGUF, machine, write_csv


def held_out_pairs(n: int, seed: int = 42) -> list[dict]:
    """The first n test-split pairs of the real data, picked as evaluate picks its judge's calibration pairs."""
    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.eval.behaviour import calibration_pairs

    return calibration_pairs(load_splits(str(REAL_DATA), seed=seed)["test"], n)


def cross_check(pairs: list[dict], judge, other) -> float:
    """The largest |p("A")| difference between two judges on the same prompts (both orders of each pair)."""
    from fine_tune_llm.eval import judge as J

    worst = 0.0
    for r in pairs:
        for first, second in ((r["answer"], r["rejected"]), (r["rejected"], r["answer"])):
            prompt = J.pairwise_prompt(r["question"], first, second)
            worst = max(worst, abs(J.label_probability(judge, prompt) - J.label_probability(other, prompt)))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--gguf", default=str(SMOL_GGUF))
    p.add_argument("--backend", choices=["llama.cpp", "transformers"], default="llama.cpp")
    p.add_argument("--cross-check", type=int, default=0, help="ask the other backend the first N pairs too")
    p.add_argument("--threads", type=int, default=1, help="torch threads (llama.cpp: half the cores, its default)")
    p.add_argument("--out", default=str(REPO / "metrics" / "bench_judge_smollm2.csv"))
    args = p.parse_args(argv)

    import torch

    from fine_tune_llm.eval import judge as J
    from fine_tune_llm.eval.judge_backends import load_judge
    from fine_tune_llm.manifest import git_state

    torch.set_num_threads(args.threads)
    pairs = held_out_pairs(args.pairs)
    wall, cpu = time.perf_counter(), time.process_time()
    judge = load_judge(args.gguf, backend="auto" if args.backend == "llama.cpp" else "transformers")
    out = J.calibrate(judge, [r["question"] for r in pairs], [r["answer"] for r in pairs],
                      [r["rejected"] for r in pairs])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    worst = None
    if args.cross_check:
        other = load_judge(args.gguf, backend="transformers" if args.backend == "llama.cpp" else "auto")
        worst = cross_check(pairs[:args.cross_check], judge, other)

    matched, info = out["length_matched"], machine()
    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": git_state().get("commit"),
        "device": info["device"], "load_avg_1m": info["load_avg_1m"], "judge": Path(args.gguf).name,
        "backend": judge.describe()["backend"], "pairs": out["pairs"],
        "agreement": round(out["agreement"], 4),
        "agreement_ci95_low": round(out["agreement_ci95"][0], 4),
        "agreement_ci95_high": round(out["agreement_ci95"][1], 4),
        "mean_p_chosen": round(out["mean_p_chosen"], 4),
        "lm_agreement": round(matched["agreement"], 4),
        "lm_agreement_ci95_low": round(matched["agreement_ci95"][0], 4),
        "lm_agreement_ci95_high": round(matched["agreement_ci95"][1], 4),
        "lm_mean_p_chosen": round(matched["mean_p_chosen"], 4),
        "position_bias": round(out["position_bias"], 4),
        "position_bias_ci95_low": round(out["position_bias_ci95"][0], 4),
        "position_bias_ci95_high": round(out["position_bias_ci95"][1], 4),
        "order_consistent": round(out["order_consistent"], 4),
        "chosen_longer": round(out["chosen_longer"], 4),
        "near_equal_length_pairs": out["near_equal_length"]["pairs"],
        "cross_check_pairs": args.cross_check, "cross_check_max_dp": "" if worst is None else round(worst, 4),
        "trusted": out["trusted"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "verdict": out["verdict"],
    }
    for key, value in row.items():
        print(f"{key:>24}: {value}")
    print(f"wrote {write_csv(args.out, [row], append=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
