"""How fast is the preference stage next to the SFT epoch it continues? One command, one machine, side by side.

    .venv/bin/python benchmarks/preference_speed.py                 # SmolLM2-135M from ../shared, 2,000 SFT rows
    .venv/bin/python benchmarks/preference_speed.py --sft-run runs/preference-speed/sft   # reuse a finished SFT run

Runs the README's commands as a user would, each in its own process (its peak RSS from wait4, its wall time):
`train --preset smollm2-135m` on the real data (2,500 rows: 2,000 train), then `train --stage dpo --sft-run RUN`
with the stage's defaults. Rows of metrics/bench_preference_speed_cpu.csv:

    sft_epoch   the SFT command, start to exit            dpo_stage   the DPO command, start to exit
    sft_step    SFT training time per optimizer step       dpo_step    DPO training time per optimizer step
    ref_pass    the DPO stage's reference pass (all train and validation pairs, as the stage recorded it)

A step's time is the training loop's runtime less its evaluations, over its steps (trainer_state.json). Goals:
dpo_step <= 2.5 x sft_step, ref_pass <= 0.5 x sft_epoch, dpo_stage <= 3 x sft_epoch and <= 3 GB peak RSS.
Measured: docs/results.md#preference-stage-speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SMOL_GGUF, machine, write_csv

COLUMNS = ["row", "seconds", "peak_rss_gb", "ratio", "goal", "met", "steps", "machine", "commit", "date", "command"]


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python -m fine_tune_llm ARGS`, its output in `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fine_tune_llm", *args], stdout=out, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fine-tune-llm {' '.join(args)} failed: see {log}")
    return seconds, usage.ru_maxrss / 2**20  # KB -> GB


def step_seconds(run: Path) -> tuple[float, int]:
    """(training seconds per optimizer step, steps): the loop's runtime less its evaluations."""
    state = json.loads((run / "trainer_state.json").read_text())
    history = state["log_history"]
    runtime = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
    evals = sum(h["eval_runtime"] for h in history if "eval_runtime" in h)
    return (runtime - evals) / state["global_step"], state["global_step"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2500, help="rows kept: 80%% train (2,000 of 2,500)")
    p.add_argument("--sft-run", default=None, help="reuse a finished SFT run (its epoch is then not re-timed: "
                                                  "give --sft-seconds and --sft-rss-gb from its own run)")
    p.add_argument("--sft-seconds", type=float, default=None)
    p.add_argument("--sft-rss-gb", type=float, default=None)
    p.add_argument("--dpo-args", default="", help="extra options for the DPO command, e.g. '--max-steps 20'")
    p.add_argument("--root", default="runs/preference-speed")
    p.add_argument("--out", default="metrics/bench_preference_speed_cpu.csv")
    args = p.parse_args(argv)
    for path in (args.model, args.data):
        if not Path(path).is_file():
            print(f"missing {path}: this benchmark needs ../shared (the real model and data)", file=sys.stderr)
            return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    where = ["--metrics-dir", str(root / "metrics"), "--imgs-dir", str(root / "imgs")]
    sft_cmd = ["train", "--preset", "smollm2-135m", "--base-model", args.model, "--dataset", args.data,
               "--data-samples", str(args.data_samples), "--output-dir", str(root / "sft"), *where]
    if args.sft_run:
        sft, sft_s, sft_rss = Path(args.sft_run), args.sft_seconds, args.sft_rss_gb
    else:
        sft = root / "sft"
        sft_s, sft_rss = run_stage(sft_cmd, root / "sft.log")
        print(f"SFT: {sft_s:.0f} s, peak RSS {sft_rss:.2f} GB", flush=True)
    dpo = root / "dpo"
    dpo_cmd = ["train", "--stage", "dpo", "--sft-run", str(sft), "--output-dir", str(dpo), *where,
               *args.dpo_args.split()]
    dpo_s, dpo_rss = run_stage(dpo_cmd, root / "dpo.log")
    print(f"DPO stage: {dpo_s:.0f} s, peak RSS {dpo_rss:.2f} GB", flush=True)
    sft_step, sft_steps = step_seconds(sft)
    dpo_step, dpo_steps = step_seconds(dpo)
    ref = json.loads((dpo / "reference_logps.json").read_text())["seconds"]
    stamp = {"machine": machine()["device"], "commit": commit(), "date": datetime.date.today().isoformat()}
    sft_line, dpo_line = "fine-tune-llm " + " ".join(sft_cmd), "fine-tune-llm " + " ".join(dpo_cmd)
    rows = [
        {"row": "sft_step", "seconds": sft_step, "steps": sft_steps, "command": sft_line},
        {"row": "dpo_step", "seconds": dpo_step, "steps": dpo_steps, "ratio": dpo_step / sft_step,
         "goal": "dpo_step / sft_step <= 2.5", "met": dpo_step / sft_step <= 2.5, "command": dpo_line},
        {"row": "ref_pass", "seconds": ref, "ratio": ref / sft_s if sft_s else None,
         "goal": "ref_pass / sft_epoch <= 0.5", "met": bool(sft_s) and ref / sft_s <= 0.5, "command": dpo_line},
        {"row": "sft_epoch", "seconds": sft_s, "peak_rss_gb": sft_rss, "steps": sft_steps, "command": sft_line},
        {"row": "dpo_stage", "seconds": dpo_s, "peak_rss_gb": dpo_rss, "steps": dpo_steps,
         "ratio": dpo_s / sft_s if sft_s else None, "goal": "dpo_stage <= 3 x sft_epoch and <= 3 GB peak RSS",
         "met": bool(sft_s) and dpo_s / sft_s <= 3 and dpo_rss <= 3, "command": dpo_line},
    ]
    write_csv(args.out, [{**{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, **stamp}
                         for row in rows], COLUMNS)
    for row in rows:
        print(f"{row['row']:<10} {row['seconds']:8.2f} s  {row.get('goal', '')}  {row.get('met', '')}")
    print(f"{args.out} ({stamp['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
