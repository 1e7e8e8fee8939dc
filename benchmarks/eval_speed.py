"""How long `fine-tune-llm evaluate` of a preference run takes, against one SFT epoch on the same machine.

    .venv/bin/python benchmarks/eval_speed.py --threads 2        # SmolLM2 on 2,000 real rows: SFT, a DPO run, then
                                                                 # evaluate (hours on a CPU: the DPO run dominates)
    .venv/bin/python benchmarks/eval_speed.py --dpo-run runs/preference-speed/dpo --threads 2
                                                # a fresh SFT epoch beside the evaluation of a full DPO run
    .venv/bin/python benchmarks/eval_speed.py --sft-run runs/eval-speed/sft --dpo-run runs/eval-speed/dpo
    .venv/bin/python benchmarks/eval_speed.py --data-samples 200 --dpo-max-steps 2 --generations 3 \\
        --max-new-tokens 16 --out /tmp/eval_speed.csv                                  # a quick check that it runs

One SFT run of the smollm2-135m preset on --data-samples real psychology rows (80% train) and one DPO stage after it
(--dpo-max-steps caps it: evaluation depends on how long DPO trained only through its answers' lengths), or the
runs given; --dpo-run alone trains the SFT epoch here, so both times come from one machine in one run. The SFT epoch's
time is the Trainer's own train_runtime from the SFT run's trainer_state.json (periodic evaluations included; a
resumed run records its last session only, so pass a run trained in one go). Then the DPO run is evaluated (base /
SFT / SFT+DPO, --generations answers per column, greedy and sampled) as `fine-tune-llm evaluate` does it, and, with
--old-path, the column-by-column evaluation it replaced (tests/test_eval_once.py's reference functions: each set
of sequences scored and each column generated on its own) on the same loaded model, for comparison.
The goal: evaluation <= 0.5x the SFT epoch. Rows go to --out (metrics/bench_eval_speed_cpu.csv); measured:
docs/results.md#evaluation-speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REAL_DATA, SMOL_GGUF, PeakMemory, machine, release_memory, write_csv

COLUMNS = ["row", "seconds", "peak_rss_gb", "ratio_to_sft_epoch", "goal", "met", "machine", "commit", "date"]
GOAL = 0.5  # evaluation at most half an SFT epoch


def sft_epoch_seconds(run) -> float:
    """The Trainer's train_runtime, as the run's trainer_state.json recorded it."""
    history = (run.trainer_state() or {}).get("log_history", [])
    runtime = [h["train_runtime"] for h in history if "train_runtime" in h]
    if not runtime:
        raise SystemExit(f"{run.trainer_state_file} records no train_runtime: train the SFT run to its end")
    return float(runtime[-1])


def make_runs(args, root: Path):
    from fine_tune_llm.config import make_config
    from fine_tune_llm.run import RunDir
    from fine_tune_llm.train.lineage import preference_config
    from fine_tune_llm.train.preference import train_preference
    from fine_tune_llm.train.sft import train

    common = {"metrics_dir": str(root / "metrics"), "imgs_dir": str(root / "imgs")}
    if args.sft_run:
        sft = RunDir.of(args.sft_run)
    else:
        real = {"base_model": args.model, "dataset": args.data, "data_samples": args.data_samples}
        cfg = make_config(args.preset, output_dir=str(root / "sft"), **common,
                          **(real if args.preset == "smollm2-135m" else {}))
        sft = train(cfg, resume=False).run
    if args.dpo_run:
        return sft, RunDir.of(args.dpo_run)
    cfg = preference_config(sft.path, max_steps=args.dpo_max_steps, output_dir=str(root / "dpo"), **common)
    return sft, train_preference(cfg, resume=False).run


def time_new(run, args, root: Path, judges: bool = False, parts: dict[str, float] | None = None) -> tuple[float, float]:
    """evaluate_run's wall time and peak RSS; `parts` gets the seconds spent scoring and generating inside it."""
    from fine_tune_llm.eval import evaluate

    timed = {"scoring": "score_model", "generation": "compare_generations"}
    originals = {name: getattr(evaluate, name) for name in timed.values()}

    def timer(part, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if parts is not None:
                    parts[part] = parts.get(part, 0.0) + time.perf_counter() - t
        return wrapped

    for part, name in timed.items():
        setattr(evaluate, name, timer(part, originals[name]))
    t0 = time.perf_counter()
    try:
        with PeakMemory() as mem:
            evaluate.evaluate_run(run, n_generations=args.generations, max_new_tokens=args.max_new_tokens,
                                  metrics_dir=root / "metrics", progress=False, generation_rows=args.generation_rows,
                                  judges=judges)
    finally:
        for name, fn in originals.items():
            setattr(evaluate, name, fn)
    return time.perf_counter() - t0, mem.peak_gb


def time_old(run, args) -> tuple[float, float]:
    """The column-by-column evaluation (load, score, generate; no report writing) with its own functions."""
    from fine_tune_llm.eval.evaluate import eval_rows, generation_prompts, load_columns
    from fine_tune_llm.model.loading import load_tokenizer
    from tests.test_eval_once import reference_columns_greedy, reference_score_model

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        cfg = run.read_config()
        rows, tokenizer = eval_rows(run, "test"), load_tokenizer(cfg)
        columns = load_columns(run, cfg)
        for name in columns.names:
            with columns.use(name) as model:
                reference_score_model(model, tokenizer, cfg, rows)
        questions = generation_prompts(rows, args.generations)
        for sample in (False, True):
            reference_columns_greedy(columns, tokenizer, questions, args.max_new_tokens, cfg.system_prompt,
                                     do_sample=sample)
    return time.perf_counter() - t0, mem.peak_gb


def prompt_share(run) -> float:
    """The share of the scored tokens that are prompt (the context before the trained answer tokens): what sharing
    a pair's prompt between its chosen and rejected answer (KV cache) could save, at most half of it."""
    from fine_tune_llm.eval.evaluate import eval_rows, scoring_parts
    from fine_tune_llm.model.loading import load_tokenizer

    cfg = run.read_config()
    parts = scoring_parts(load_tokenizer(cfg), cfg, eval_rows(run, "test"))
    masks = [m for enc in parts.values() for m, s in zip(enc["completion_mask"], enc["status"]) if s != "too_long"]
    total = sum(len(m) for m in masks)
    return sum(len(m) - sum(m) for m in masks) / total if total else float("nan")


def row(name: str, seconds: float, peak: float, sft_s: float, goal: str, met: Any, info: dict) -> dict[str, Any]:
    return {"row": name, "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2) if peak else "",
            "ratio_to_sft_epoch": round(seconds / sft_s, 3), "goal": goal, "met": met, **info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=["smollm2-135m", "tiny"],
                   help="tiny: the offline toy on its shipped sample (--model, --data, --data-samples unused)")
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--data", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2500, help="rows kept: 80%% train (2,000 of 2,500)")
    p.add_argument("--sft-run", default=None, help="reuse this SFT run (trained in one go: its time is read)")
    p.add_argument("--dpo-run", default=None, help="reuse this DPO run (of --sft-run) instead of training one")
    p.add_argument("--dpo-max-steps", type=int, default=20, help="a short DPO stage: evaluation costs the same")
    p.add_argument("--generations", type=int, default=None,
                   help="held-out questions answered by every column (default: the run's eval_generations)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="evaluate's default")
    p.add_argument("--generation-rows", type=int, default=None, help="answers a generate call (default: evaluate's)")
    p.add_argument("--old-path", action="store_true", help="also time the column-by-column evaluation")
    p.add_argument("--judges", action="store_true",
                   help="also time evaluate with the reward judge and safety probe: once training the judge, once reading it back")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--root", default="runs/eval-speed")
    p.add_argument("--out", default="metrics/bench_eval_speed_cpu.csv")
    args = p.parse_args(argv)
    for path in (args.model, args.data) if args.preset == "smollm2-135m" and not args.dpo_run else ():
        if not Path(path).is_file():
            print(f"missing {path}: this benchmark needs ../shared (the real model and data)", file=sys.stderr)
            return 2
    import torch

    from fine_tune_llm.manifest import git_state
    from fine_tune_llm.model.generation import GENERATION_ROWS

    if args.threads:
        torch.set_num_threads(args.threads)
    args.generation_rows = args.generation_rows or GENERATION_ROWS
    root = Path(args.root)
    sft, dpo = make_runs(args, root)
    sft_s = sft_epoch_seconds(sft)
    if args.generations is None:
        args.generations = dpo.read_config().eval_generations
    print(f"prompt tokens: {prompt_share(dpo):.1%} of the tokens scored", flush=True)
    release_memory()
    info = {"machine": "; ".join(f"{k} {v}" for k, v in machine().items()), "commit": git_state().get("commit"),
            "date": date.today().isoformat()}
    rows = [row("sft_epoch", sft_s, 0.0, sft_s, "", "", info)]
    if args.old_path:
        seconds, peak = time_old(dpo, args)
        rows.append(row("evaluate_column_by_column", seconds, peak, sft_s, "reference (the path replaced)", "", info))
        release_memory()
    parts: dict[str, float] = {}
    seconds, peak = time_new(dpo, args, root, parts=parts)
    what = f"{args.generations} generations of <= {args.max_new_tokens} tokens, {args.generation_rows} rows a batch"
    rows.append(row(f"evaluate ({what})", seconds, peak, sft_s, f"<= {GOAL}x SFT epoch", seconds <= GOAL * sft_s,
                    info))
    rows.append(row("  of which: scoring the columns (every test pair, prompts shared)", parts["scoring"], 0.0, sft_s,
                    "", "", info))
    rows.append(row(f"  of which: generations ({what})", parts.get("generation", 0.0), 0.0, sft_s, "", "", info))
    if args.judges:  # the judged section on top: the reward judge trained (then read back), the safety probe
        import shutil

        shutil.rmtree(dpo.reward_judge_dir, ignore_errors=True)
        for when in ("trains the reward judge", "reward judge read back"):
            release_memory()
            seconds, peak = time_new(dpo, args, root, judges=True)
            rows.append(row(f"evaluate with judges, {when} ({what})", seconds, peak, sft_s, "", "", info))
    write_csv(args.out, rows, COLUMNS)
    for r in rows:
        print(f"{r['row']}: {r['seconds']} s, {r['ratio_to_sft_epoch']}x SFT epoch, peak {r['peak_rss_gb']} GB")
    print(f"{args.out} ({info['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
