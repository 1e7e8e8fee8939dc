"""Does a preference stage after SFT move a real chat model the intended way, and only that way?

    .venv/bin/python benchmarks/preference_goal.py                       # SmolLM2-135M from ../shared, 2,000 SFT rows
    .venv/bin/python benchmarks/preference_goal.py --settings sigmoid:0.1:2e-5 --dpo-max-steps 60   # one setting
    .venv/bin/python benchmarks/preference_goal.py --preset tiny --settings sigmoid:0.1:1.5e-4 --dpo-max-steps 20 \
        --generations 5 --max-new-tokens 128 --out metrics/bench_preference_tiny.csv    # the offline toy, seconds

One SFT run (the smollm2-135m preset on --data-samples rows: 80% train), evaluated (base / SFT), then one DPO
stage per setting (loss_type:beta:learning_rate) from that SFT run, on the same training questions, each
evaluated (base / SFT / SFT+DPO) on the SFT run's held-out test split, all on the released (unquantized) base
weights. The goal (the preference issue): the SFT+DPO mean length-normalized margin's 95% CI lies above the
SFT one's, while response_j's perplexity rises by at most 10% and the mean generated length changes by at most
20%. Every setting is a row of the CSV, so a trade-off is shown rather than hidden. Wall times are this machine's.

What it costs. A DPO setting adds a reference pass over the pairs and steps of twice the tokens, and TRL's
DPOTrainer projects every position onto the vocabulary, so on a CPU without native bf16 (float32) the full-size run
takes hours: run it on a bf16-native CPU or a GPU, or use --dpo-max-steps and say so.

Measured (the goal run, the scaled-down DPO/SimPO runs, what each costs): docs/results.md#preference-stage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SHARED, machine, write_csv

SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
COLUMNS = ["row", "loss_type", "beta", "learning_rate", "dpo_steps", "train_seconds", "eval_seconds",
           "base_perplexity", "sft_perplexity", "dpo_perplexity", "base_margin", "sft_margin", "sft_margin_ci_low",
           "sft_margin_ci_high", "dpo_margin", "dpo_margin_ci_low", "dpo_margin_ci_high", "base_accuracy",
           "sft_accuracy", "dpo_accuracy", "base_gen_tokens", "sft_gen_tokens", "dpo_gen_tokens", "base_ended",
           "sft_ended", "dpo_ended", "generations", "goal_met", "why", "sft_train_seconds", "threads", "device"]
PPL_RISE = 0.10  # at most 10% higher perplexity of the chosen answers than SFT's
LENGTH_CHANGE = 0.20  # mean generated length within 20% of SFT's


def goal(sft: dict[str, Any], dpo: dict[str, Any], sft_len: float, dpo_len: float) -> tuple[bool, str]:
    """(met, why): margin CI above SFT's, perplexity rise <= 10%, generated length change <= 20%."""
    failures = []
    if not dpo["margin_ci95"][0] > sft["margin_ci95"][1]:
        failures.append(f"margin CI {dpo['margin_ci95']} not above SFT's {sft['margin_ci95']}")
    if dpo["perplexity"] > (1 + PPL_RISE) * sft["perplexity"]:
        failures.append(f"perplexity {dpo['perplexity']:.3f} > {1 + PPL_RISE:.2f} x SFT's {sft['perplexity']:.3f}")
    if sft_len and abs(dpo_len / sft_len - 1) > LENGTH_CHANGE:
        failures.append(f"generated length {dpo_len:.1f} vs SFT's {sft_len:.1f} tokens")
    return not failures, "; ".join(failures) or "met"


def row_of(setting: str, report: dict[str, Any], steps: int, train_s: float, eval_s: float) -> dict[str, Any]:
    loss, beta, lr = setting.split(":")
    m, lengths = report["metrics"], report["generation_lengths"]
    base, sft, dpo = m["base"], m["sft"], m["tuned"]
    met, why = goal(sft, dpo, lengths["sft"]["mean_new_tokens"] or 0, lengths["tuned"]["mean_new_tokens"] or 0)
    return {"row": f"dpo-{loss}-{beta}-{lr}", "loss_type": loss, "beta": float(beta), "learning_rate": float(lr),
            "dpo_steps": steps, "train_seconds": round(train_s), "eval_seconds": round(eval_s),
            "base_perplexity": base["perplexity"], "sft_perplexity": sft["perplexity"],
            "dpo_perplexity": dpo["perplexity"], "base_margin": base["mean_margin"], "sft_margin": sft["mean_margin"],
            "sft_margin_ci_low": sft["margin_ci95"][0], "sft_margin_ci_high": sft["margin_ci95"][1],
            "dpo_margin": dpo["mean_margin"], "dpo_margin_ci_low": dpo["margin_ci95"][0],
            "dpo_margin_ci_high": dpo["margin_ci95"][1], "base_accuracy": base.get("accuracy_normalized"),
            "sft_accuracy": sft.get("accuracy_normalized"), "dpo_accuracy": dpo.get("accuracy_normalized"),
            "base_gen_tokens": lengths["base"]["mean_new_tokens"], "sft_gen_tokens": lengths["sft"]["mean_new_tokens"],
            "dpo_gen_tokens": lengths["tuned"]["mean_new_tokens"], "base_ended": lengths["base"]["ended_turn"],
            "sft_ended": lengths["sft"]["ended_turn"], "dpo_ended": lengths["tuned"]["ended_turn"],
            "generations": lengths["tuned"]["answers"], "goal_met": met, "why": why}


def write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Rewritten after every setting, so a long run that is stopped keeps the rows it finished."""
    write_csv(path, rows, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=["smollm2-135m", "tiny"],
                   help="tiny: the offline toy on its shipped sample, as notebook 02 runs it (--model, --data and "
                        "--data-samples are not used)")
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2500, help="rows kept: 80%% train (2,000 of 2,500)")
    p.add_argument("--settings", default="sigmoid:0.1:2e-5,sigmoid:0.05:5e-5,ipo:0.1:2e-5",
                   help="comma-separated loss_type:beta:learning_rate")
    p.add_argument("--dpo-max-steps", type=int, default=-1, help="cap on DPO steps (-1: one epoch of the pairs)")
    p.add_argument("--generations", type=int, default=20, help="held-out questions answered greedily per column")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on each generated answer")
    p.add_argument("--sft-run", default=None, help="reuse a finished SFT run of this recipe instead of training one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--root", default="runs/preference-goal")
    p.add_argument("--out", default="metrics/bench_preference_smollm2.csv")
    args = p.parse_args(argv)
    for path in (args.model, args.data) if args.preset == "smollm2-135m" else ():
        if not Path(path).is_file():
            print(f"missing {path}: this benchmark needs ../shared (the real model and data)", file=sys.stderr)
            return 2
    from fine_tune_llm.config import make_config
    from fine_tune_llm.eval.evaluate import evaluate_run
    from fine_tune_llm.train.lineage import preference_config
    from fine_tune_llm.train.preference import train_preference
    from fine_tune_llm.train.sft import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.root)
    common = {"metrics_dir": str(root / "metrics"), "imgs_dir": str(root / "imgs")}
    t0 = time.perf_counter()
    if args.sft_run:  # an SFT run trained earlier with this recipe (its seconds are then not measured here)
        from fine_tune_llm.run import RunDir

        sft, sft_seconds = RunDir.of(args.sft_run), None
    else:
        real = {"base_model": args.model, "dataset": args.data, "data_samples": args.data_samples}
        sft_cfg = make_config(args.preset, output_dir=str(root / "sft"), **common,
                              **(real if args.preset == "smollm2-135m" else {}))
        sft = train(sft_cfg, resume=False).run
        sft_seconds = round(time.perf_counter() - t0)
        print(f"SFT: {sft_seconds} s", flush=True)
    rows = []
    for setting in args.settings.split(","):
        loss, beta, lr = setting.split(":")
        cfg = preference_config(sft.path, loss_type=loss, beta=float(beta), learning_rate=float(lr),
                                max_steps=args.dpo_max_steps, output_dir=str(root / f"dpo-{loss}-{beta}-{lr}"),
                                **common)
        t0 = time.perf_counter()
        result = train_preference(cfg, resume=False)
        t1 = time.perf_counter()
        report = evaluate_run(result.run, n_generations=args.generations, max_new_tokens=args.max_new_tokens,
                              metrics_dir=root / "metrics", progress=False)
        rows.append({**row_of(setting, report, result.global_step, t1 - t0, time.perf_counter() - t1),
                     "sft_train_seconds": sft_seconds, "threads": args.threads or "all", "device": machine()["device"]})
        print({k: rows[-1][k] for k in ("row", "dpo_margin", "sft_margin", "dpo_perplexity", "goal_met", "why")},
              flush=True)
        write_rows(args.out, rows)
    print(f"{args.out} ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
