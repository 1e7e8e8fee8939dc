"""The whole CPU recipe, timed: today's smollm2-135m preset (`previous`) against the proposed one, back to back.

    .venv/bin/python benchmarks/recipe_time.py --threads 1                   # the committed run (~1 h on 2 busy cores)
    .venv/bin/python benchmarks/recipe_time.py --data-samples 300 --threads 1  # a quick look (a few minutes)
    .venv/bin/python benchmarks/recipe_time.py --model tiny --data-samples 40 --max-steps 3   # what the test runs

Each row is the job a user runs, `fine-tune-llm train --preset smollm2-135m --base-model <SmolLM2 GGUF> --dataset
<the real parquet> --data-samples 2500` (2,000 train rows, one epoch of 250 steps x 8 rows, with the preset's periodic
evaluations on the validation split and its checkpoints), run through `fine_tune_llm.train.sft.train` in a fresh
subprocess per row, so each row's peak RSS is its own (the child's ru_maxrss; a sampler thread also splits it by phase:
model load, training steps, evaluations). Then, in the same child, the row's adapter is scored on the run's saved
test split with the package's evaluation function (eval.evaluate.score_model: answer perplexity, and the preference
margin with its bootstrap 95% CI), on the base as released (unquantized weights) as a user runs it after the merge,
in the compute dtype `auto` picks (bf16 on a bf16-native CPU, where it is faster; `fine-tune-llm evaluate` computes
in fp32). Both rows are scored on the same base the same way, so they compare; up to commit 8d4a0c8 each row was scored
on its training model, which put `previous` on its NF4 base.

Rows:
  previous      today's preset (commit d305038), every value hard-coded below (PREVIOUS), so this row stays
                reproducible after the preset changes;
  smollm2-135m  the package's smollm2-135m preset with common.PROPOSED applied on top: the values the preset
                should carry (empty now: config.py carries them all), and common.RUNTIME_PROPOSED,
                the code levers (the package has lora_nocast since; patching it again changes nothing).
`previous` trains in bf16 (the old `dtype: auto` on any CPU). On a CPU without avx512_bf16 or AMX (AVX2 only) torch
emulates bf16, so that row would take many times longer there (docs/results.md#cpus-without-native-bf16), while
`auto` now picks float32. Run this comparison on a CPU with native bf16 (lscpu: avx512_bf16 or amx_bf16).
Writes metrics/bench_recipe_cpu.csv: row,seconds,peak_rss_gb,heldout_ppl,heldout_margin, then the details (margin
CI, evaluation seconds, CPU seconds, peak RSS per phase, RSS every 10 steps, the resolved config).

Measured: docs/results.md#the-cpu-recipe (both rows, lora_layers sweep, A/B runs, memory).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (
    PROPOSED,
    REAL_DATA,
    REPO,
    RUNTIME_PROPOSED,
    SMOL_GGUF,
    apply_runtime,
    cpu_description,
    rss_gb,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Today's smollm2-135m preset, resolved (config.py at commit d305038: the preset's own values plus the dataclass
# defaults it inherits). Hard-coded so `previous` measures the same recipe whatever config.py says later.
PREVIOUS = {
    "preset": "smollm2-135m", "requires_cuda": False, "quantization": "4bit", "optim": "adamw_torch", "lora_r": 16, "lora_alpha": 32,
    "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 2e-4, "num_epochs": 1.0, "max_steps": -1, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.03,
    "lr_scheduler": "cosine", "max_grad_norm": 1.0, "dtype": "bfloat16", "gradient_checkpointing": False, "padding_free": True,
    "attn_implementation": "eager", "loss_impl": "auto", "upcast_frozen": False, "max_length": 384, "val_fraction": 0.1,
    "test_fraction": 0.1, "system_prompt": None, "logging_steps": 10, "eval_steps": 50, "save_steps": 50, "save_total_limit": 3,
    "seed": 42,
}

ROWS = {
    # Without the freed-memory trim (trainer.ReturnFreedMemory), which the package's CPU runs have had since.
    "previous": {"base": "previous", "trim": False},
    # The package's preset + PROPOSED (config values) + RUNTIME_PROPOSED (code levers, patched in for training).
    "smollm2-135m": {"base": "preset", "config": PROPOSED, "runtime": RUNTIME_PROPOSED},
}
CSV_COLUMNS = ["row", "seconds", "peak_rss_gb", "heldout_ppl", "heldout_margin"]


def row_config(name: str, a, out_dir: Path):
    """The TrainConfig of a row: every field explicit for `previous`, the preset + PROPOSED for the new one."""
    from fine_tune_llm.config import field_defaults, field_names, make_config

    spec = ROWS[name]
    job = {"output_dir": str(out_dir / "run"), "metrics_dir": str(out_dir / "metrics"), "imgs_dir": str(out_dir / "imgs")}
    model, dataset = model_and_data(a)
    job.update(base_model=model, dataset=dataset, data_samples=a.data_samples)
    if a.max_steps:
        job["max_steps"] = a.max_steps
    if spec["base"] == "previous":
        # Dataclass defaults for any field added after d305038, then today's preset values: no preset is read.
        values = {k: v for k, v in {**field_defaults(), **PREVIOUS, **job}.items() if v is not None and k != "preset"}
        return dataclasses.replace(make_config("gemma-2b-it", **values), preset=PREVIOUS["preset"])
    values = {**spec.get("config", {}), **dict(getattr(a, "set", None) or []), **job}
    return make_config("smollm2-135m", **{k: v for k, v in values.items() if k in field_names()})


def model_and_data(a) -> tuple[str, str]:
    if a.model == "tiny":  # the test: the tiny Gemma and the sample data shipped in the package
        return "tiny-gemma", "sample"
    return a.model, a.dataset


# --- the child: one row, in its own process ------------------------------------------------------------------

class Phases:
    """Peak RSS per phase (load / train / eval), sampled every 50 ms, and the time spent in evaluations."""

    def __init__(self):
        self.phase = "load"
        self.peak: dict[str, float] = {}
        self.eval_seconds = 0.0
        self.evals = 0
        self.steps = 0
        self.rss_at_step: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), rss_gb())
            self._stop.wait(0.05)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()


def instrument(phases: Phases, runtime: dict, trim: bool = True) -> None:
    """Wrap training.build_trainer so the trainer reports its phases (no change to what it computes), and apply the
    row's code levers (common.apply_runtime) to the model it trains; trim=False removes the package's freed-memory
    trim, as the `previous` recipe ran."""
    from transformers import TrainerCallback

    from fine_tune_llm.train import sft as training
    from fine_tune_llm.train.trainers import ReturnFreedMemory

    original = training.build_trainer

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            phases.phase = "train"

        def on_step_end(self, args, state, control, **kw):
            phases.steps = state.global_step
            if state.global_step % 10 == 0:
                phases.rss_at_step.append((state.global_step, round(rss_gb(), 2)))

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        apply_runtime(trainer.model, runtime)
        if not trim:
            trainer.remove_callback(ReturnFreedMemory)
        trainer.add_callback(_Cb())
        evaluate = trainer.evaluate

        def timed_evaluate(*a, **k):
            phases.phase, t0 = "eval", time.perf_counter()
            try:
                return evaluate(*a, **k)
            finally:
                phases.eval_seconds += time.perf_counter() - t0
                phases.evals += 1
                phases.phase = "train"

        trainer.evaluate = timed_evaluate
        return trainer

    training.build_trainer = build_trainer


def released_model(cfg):
    """The row's adapter on the base as released (unquantized weights), computing in the dtype `auto` picks here
    (bf16 on a bf16-native CPU): what a user of either recipe runs after the merge. Scoring the training model
    instead would score `previous` on its NF4 base, whose own perplexity is 23% worse (8.99 against 7.29), and the
    rows would differ by their bases, not by their training. Returns (model, tokenizer)."""
    from fine_tune_llm.eval.evaluate import load_for_eval
    from fine_tune_llm.run import RunDir

    released = dataclasses.replace(cfg, quantization="none")
    return load_for_eval(released, RunDir.of(cfg.output_dir).adapter_dir, dtype="auto")


def child(name: str, a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from fine_tune_llm.eval.evaluate import eval_rows, score_model
    from fine_tune_llm.run import RunDir
    from fine_tune_llm.train.sft import train

    phases = Phases().start()
    runtime = ROWS[name].get("runtime", {})
    instrument(phases, runtime, trim=ROWS[name].get("trim", True))
    with tempfile.TemporaryDirectory(prefix=f"recipe-{name}-") as tmp:
        cfg = row_config(name, a, Path(tmp))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = train(cfg, resume=False)
        seconds, cpu_seconds = time.perf_counter() - wall0, time.process_time() - cpu0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        phases.phase = "heldout"
        steps, train_loss, eval_loss = result.global_step, result.train_loss, result.eval_loss
        del result  # the training model: each row is scored on the same released base instead (released_model)
        gc.collect()
        model, tokenizer = released_model(cfg)
        test = eval_rows(RunDir.of(cfg.output_dir), "test")  # the run's own saved test split
        t0 = time.perf_counter()
        m = score_model(model, tokenizer, cfg, test, batch_size=8, progress=False)
        heldout_seconds = time.perf_counter() - t0
    phases.stop()
    lo, hi = m.get("margin_ci95", (float("nan"), float("nan")))
    return {
        "row": name, "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2),
        "heldout_ppl": round(m["perplexity"], 4), "heldout_margin": round(m.get("mean_margin", float("nan")), 4),
        "heldout_margin_ci95_low": round(lo, 4), "heldout_margin_ci95_high": round(hi, 4),
        "heldout_rows": len(test), "heldout_pairs": m.get("pairs", 0), "heldout_seconds": round(heldout_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1), "train_steps": steps, "evals": phases.evals,
        "eval_seconds": round(phases.eval_seconds, 1), "train_loss": train_loss, "eval_loss": eval_loss,
        "peak_rss_load_gb": round(phases.peak.get("load", 0.0), 2),
        "peak_rss_train_gb": round(phases.peak.get("train", 0.0), 2),
        "peak_rss_eval_gb": round(phases.peak.get("eval", 0.0), 2),
        "rss_by_step": json.dumps(phases.rss_at_step),
        "config": json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "metrics_dir",
                                                                              "imgs_dir")}),
    }


# --- the parent: one subprocess per row ----------------------------------------------------------------------

def run_child(name: str, a) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", name, "--child-out", out.name, "--model", a.model,
               "--dataset", a.dataset, "--data-samples", str(a.data_samples), "--max-steps", str(a.max_steps)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        for key, value in a.set or []:
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"row {name} failed (exit {proc.returncode})")
        row = json.loads(Path(out.name).read_text())
    row["peak_rss_with_heldout_gb"] = round(usage.ru_maxrss / 2**20, 2)
    return row


def setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=JSON, e.g. lora_layers=10")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a bare string: --set attn_implementation=sdpa
    if parsed is None:  # make_config reads None as "not given": the preset's value would stay, silently
        raise argparse.ArgumentTypeError(f"{text!r}: null keeps the preset's value; give a value (lora_layers: "
                                         f"the model's block count adapts every block)")
    return key.strip(), parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--model", default=str(SMOL_GGUF), help="a .gguf file, a HF folder, or 'tiny' (tests)")
    p.add_argument("--dataset", default=str(REAL_DATA))
    p.add_argument("--data-samples", type=int, default=2500, help="2500 = 2,000 train rows, 250 steps x 8")
    p.add_argument("--max-steps", type=int, default=0, help="cap the steps (tests); 0 = one epoch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--set", action="append", type=setting, metavar="FIELD=JSON",
                   help="try a config value on the smollm2-135m row (repeatable), e.g. --set lora_layers=10")
    p.add_argument("--out", default=str(REPO / "metrics" / "bench_recipe_cpu.csv"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        Path(a.child_out).write_text(json.dumps(child(a.child, a)))
        return 0
    if a.model != "tiny":
        missing = [x for x in (a.model, a.dataset) if not Path(x).exists()]
        if missing:
            print(f"SKIPPED: needs the real model and data from ../shared (missing: {', '.join(missing)})")
            return 0
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    from fine_tune_llm.config import field_names

    bad = [k for k, _ in a.set or [] if k not in field_names()]
    if bad:
        p.error(f"--set: unknown config field(s) {bad}")
    rows = []
    for name in names:
        print(f"row {name}: training in a fresh process ...", flush=True)
        rows.append(run_child(name, a))
        r = rows[-1]
        print(f"  {name}: {r['seconds']:.0f} s ({r['evals']} evaluations: {r['eval_seconds']:.0f} s), peak RSS "
              f"{r['peak_rss_gb']:.2f} GB, held-out perplexity {r['heldout_ppl']:.3f}, margin {r['heldout_margin']:.4f} "
              f"[{r['heldout_margin_ci95_low']:.4f}, {r['heldout_margin_ci95_high']:.4f}]", flush=True)
    extra = {"device": cpu_description(), "threads": a.threads or "default", "data_samples": a.data_samples,
             "model": Path(a.model).name}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = CSV_COLUMNS + [k for k in rows[0] if k not in CSV_COLUMNS] + list(extra)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **extra})
    by = {r["row"]: r for r in rows}
    if "previous" in by and "smollm2-135m" in by:
        o, n = by["previous"], by["smollm2-135m"]
        print(f"new / previous: {n['seconds'] / o['seconds']:.2f}x the seconds, peak RSS {n['peak_rss_gb']:.2f} vs "
              f"{o['peak_rss_gb']:.2f} GB, perplexity {100 * (n['heldout_ppl'] / o['heldout_ppl'] - 1):+.2f}%, margin "
              f"{n['heldout_margin']:.4f} vs {o['heldout_margin']:.4f} (previous CI [{o['heldout_margin_ci95_low']:.4f},"
              f" {o['heldout_margin_ci95_high']:.4f}])")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
