"""How well does the reward-model judge (eval/reward_judge.py) tell the chosen answer from the rejected one on
held-out pairs when length cannot help it, and what does it cost?

    .venv/bin/python benchmarks/reward_judge.py                           # SmolLM2-135M, 2,000 rows, CPU default
    .venv/bin/python benchmarks/reward_judge.py --max-pairs 400 --epochs 2  # another setting: one more CSV row

Builds a run directory as training would (the smollm2-135m preset's config and a saved split of --data-samples
psychology rows: 80% train, 10% test, grouped by question) without training the run itself, then trains the judge on
the train pairs and measures it on the test pairs: accuracy raw (whole answers), length-matched (both cut to the
shorter one's length), half (both cut to half that) and the length-only control (the longer answer wins), each
with a 95% bootstrap interval. The goal: length-matched accuracy >= 90%. One CSV row per invocation (appended).
Measured: docs/results.md#reward-model-judge.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SMOL_GGUF, machine, write_csv

COLUMNS = ["setting", "train_cut", "train_pairs", "test_pairs", "steps", "train_seconds", "heldout_seconds", "wall_seconds",
           "raw", "raw_ci_low", "raw_ci_high", "matched", "matched_ci_low", "matched_ci_high", "half",
           "half_ci_low", "half_ci_high", "longer_wins", "chosen_longer", "goal_met", "threads", "device", "load_1m"]
GOAL = 0.90


def build_run(root: Path, model: str, data: str, samples: int):
    """A run directory holding what a trained run holds for the judge: config.yaml and splits.json."""
    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.rows import config_splits
    from fine_tune_llm.run import RunDir

    cfg = make_config("smollm2-135m", base_model=model, dataset=data, data_samples=samples, output_dir=str(root))
    run = RunDir.of(root)
    if not run.splits_file.is_file():
        run.write_config(cfg)
        run.save_splits(config_splits(cfg), cfg.dataset)
    return run


def row_of(setting: str, record: dict, wall: float) -> dict:
    h = record["heldout"]
    from fine_tune_llm.eval.reward_judge import TRAIN_CUT

    row = {"setting": setting, "train_cut": TRAIN_CUT, "train_pairs": record["train_pairs"], "test_pairs": h["pairs"],
           "steps": record["steps"], "train_seconds": record["train_seconds"],
           "heldout_seconds": record["heldout_seconds"], "wall_seconds": round(wall, 1),
           "longer_wins": round(h["longer_wins"]["accuracy"], 4), "chosen_longer": round(h["chosen_longer"], 4),
           "goal_met": h["matched"]["accuracy"] >= GOAL}
    for key in ("raw", "matched", "half"):
        row[key] = round(h[key]["accuracy"], 4)
        row[f"{key}_ci_low"], row[f"{key}_ci_high"] = (round(v, 4) for v in h[key]["ci95"])
    info = machine()
    return {**row, "threads": info["threads"], "device": info["device"], "load_1m": info["load_avg_1m"]}


def append_row(path: str, row: dict) -> None:
    write_csv(path, [row], COLUMNS, append=True)


def main(argv: list[str] | None = None) -> int:
    from fine_tune_llm.eval.reward_judge import JudgeOptions, describe, reward_judge

    defaults = JudgeOptions.cpu()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2000, help="rows split 80/10/10 by question")
    p.add_argument("--max-pairs", type=int, default=defaults.max_pairs)
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--lora-layers", type=int, default=defaults.lora_layers)
    p.add_argument("--max-answer-tokens", type=int, default=defaults.max_answer_tokens)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--root", default="runs/reward-judge")
    p.add_argument("--out", default="metrics/bench_reward_judge.csv")
    args = p.parse_args(argv)
    for path in (args.model, args.data):
        if not Path(path).is_file():
            print(f"missing {path}: this benchmark needs ../shared (the real model and data)", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = dataclasses.replace(defaults, max_pairs=args.max_pairs, epochs=args.epochs,
                                  learning_rate=args.learning_rate, lora_layers=args.lora_layers,
                                  max_answer_tokens=args.max_answer_tokens)
    run = build_run(Path(args.root), args.model, args.data, args.data_samples)
    t0 = time.perf_counter()
    judge = reward_judge(run, options, retrain=True)
    wall = time.perf_counter() - t0
    setting = (f"pairs={options.max_pairs} epochs={options.epochs:g} lr={options.learning_rate:g} "
               f"lora_layers={options.lora_layers} r={options.lora_r} tokens={options.max_answer_tokens}")
    row = row_of(setting, judge.record, wall)
    append_row(args.out, row)
    print(describe(judge.record))
    print(f"{args.out}: {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
