"""Does the GPU path work? One command for the day a GPU is there (issue #14): benchmarks/gpu_check.sh.

Under 8 minutes on one H200, offline: a gemma-2b-it-shaped model (gemma-2b-it's published config, random
weights) is built once into the cache, with the real tokenizer and data from ../shared. Checks, in order:
  auto       the precision and loss path `dtype: auto` / `loss_impl: auto` pick on this GPU;
  grads      4-bit LoRA gradients against the same LoRA on the dequantized weights in plain bf16;
  rows       naive / trl-default / ours QLoRA rows of benchmarks/train_throughput.py (what each row means is
             written there): trained tokens/s, peak VRAM, and for `ours` the memory estimate beside it;
  bf16, fp16 one optimizer step each of the training path (train.sft.train) in that dtype: finite loss, and
             the LoRA weights in the dtype the GradScaler needs;
  fsdp       a few steps under configs/accelerate/fsdp_qlora.yaml with one process;
  ddp        one step of 2-rank DDP (configs/accelerate/multi_gpu_ddp.yaml) where two GPUs are present.
Writes metrics/bench_train_throughput_cuda.csv (the rows) and metrics/gpu_check_cuda.csv (every check).
Exit status: 0 all passed, 1 a check failed, 2 no CUDA GPU (or ../shared missing).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import GEMMA_TOKENIZER, REAL_DATA, REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# gemma-2b-it's config.json as published (google/gemma-2b-it), the shape the default preset trains.
GEMMA_2B_IT_SHAPE = {"hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                     "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000}
# --quick: the same architecture at a size any CUDA GPU holds, to try the script itself.
QUICK_SHAPE = {**GEMMA_2B_IT_SHAPE, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
               "head_dim": 64}
ROWS = ("naive", "trl-default", "ours")
CONFIGS = REPO / "configs" / "accelerate"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"throughput rows, from: {', '.join(ROWS)}")
    p.add_argument("--skip", default="", help="checks to skip: auto,grads,rows,bf16,fp16,dpo,fsdp,ddp")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per throughput row")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the timings")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--naive-micro-batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a small Gemma instead of gemma-2b-it's shape")
    p.add_argument("--out", default=str(REPO / "metrics"))
    a = p.parse_args(argv)
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    return a


def gemma_config(tokenizer, shape: dict):
    """A GemmaConfig of `shape` with the tokenizer's special ids; the vocabulary must be the tokenizer's."""
    from transformers import GemmaConfig

    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the shape's vocabulary {shape['vocab_size']}")
    return GemmaConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, max_position_embeddings=8192,
                       **shape)


def build_model_dir(tokenizer, shape: dict) -> Path:
    """The random-weight model as a bf16 safetensors folder with the tokenizer, built once (on the GPU: 2.5B
    parameters initialise in seconds there) into the package cache."""
    import hashlib

    from transformers import AutoModelForCausalLM

    from fine_tune_llm.model.tiny import (
        cache_root,  # the package cache (model/tiny.py builds its model there too)
    )

    key = hashlib.sha256(json.dumps([shape, len(tokenizer), "gpu-check-v1"], sort_keys=True).encode()).hexdigest()
    target = cache_root() / f"gpu-check-gemma-{key[:12]}"
    if (target / "model.safetensors.index.json").is_file() or (target / "model.safetensors").is_file():
        return target
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(gemma_config(tokenizer, shape), dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".building-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def missing_requirements() -> str | None:
    """Why this machine cannot run the check, or None."""
    if not torch.cuda.is_available():
        from fine_tune_llm.model.hardware import no_cuda_reason

        return f"gpu_check needs a CUDA GPU: {no_cuda_reason()}"
    missing = [str(p) for p in (GEMMA_TOKENIZER, REAL_DATA) if not p.exists()]
    return f"gpu_check needs ../shared (missing: {', '.join(missing)})" if missing else None


# --- checks -------------------------------------------------------------------------------------------------

def check_auto(ctx) -> dict:
    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.hardware import precision
    from fine_tune_llm.train import answer_loss as fast_loss

    p = precision(make_config("gemma-2b-it"))
    answer_only, why = fast_loss.choose("auto")
    loss = "answer-only logits" if answer_only else "TRL's fused Triton head"
    ctx["auto"] = {"dtype": p.dtype, "loss": loss}
    return {"ok": True, "detail": f"{p.device}: dtype {p.dtype} ({p.reason}); loss {loss} ({why})"}


def compare_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Worst relative error (|got - want| / |want|, per tensor) and lowest cosine similarity, over all tensors."""
    rel, cos = 0.0, 1.0
    for name, w in want.items():
        g, w = got[name].float().flatten(), w.float().flatten()
        rel = max(rel, float((g - w).norm() / w.norm().clamp(min=1e-30)))
        cos = min(cos, float(torch.nn.functional.cosine_similarity(g, w, dim=0)))
    return {"max_rel_err": rel, "min_cosine": cos, "tensors": len(want)}


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    from fine_tune_llm.train.answer_loss import answer_only_nll

    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        nll, _, _ = answer_only_nll(model, {k: v.to(device) for k, v in batch.items()})
    nll.mean().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def dequantize_base_layers(model) -> int:
    """Swap every 4-bit base layer under a LoRA layer for a bf16 nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.bfloat16)
            plain = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
            plain.weight.data.copy_(w)
            plain.weight.requires_grad_(False)
            module.base_layer = plain
            n += 1
    return n


def check_grads(ctx) -> dict:
    """LoRA B starts at zero, so A's gradient would be zero: both are set to random values first."""
    from fine_tune_llm.model.loading import add_lora, load_model

    cfg = ctx["cfg"](dtype="bfloat16", lora_dropout=0.0)
    model = add_lora(load_model(cfg), cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = (torch.randn_like(p, dtype=torch.float32) * 0.02).to(p.dtype)
    batch = ctx["eval_batches"][0]
    got = lora_grads(model, batch)
    swapped = dequantize_base_layers(model)
    want = lora_grads(model, batch)
    stats = compare_grads(got, want)
    del model
    ok = stats["max_rel_err"] < 0.05 and stats["min_cosine"] > 0.998
    return {"ok": ok, "detail": f"{swapped} layers: max rel err {stats['max_rel_err']:.4f} (< 0.05), min cosine "
                                f"{stats['min_cosine']:.5f} (> 0.998) over {stats['tensors']} LoRA tensors"}


def estimate_for(ctx, row: dict) -> float:
    """The memory estimate for `ours` with the largest micro-batch the row trained on."""
    from transformers import AutoConfig

    from fine_tune_llm.train.memory_estimate import estimate

    lengths = [len(x) for x in ctx["train"]["input_ids"]]
    tokens = max(sum(lengths[i:i + ctx["batch"]]) for i in range(0, len(lengths), ctx["batch"]))
    cfg = ctx["cfg"](batch_size=ctx["batch"], lora_dropout=0.0)
    return estimate(cfg, AutoConfig.from_pretrained(ctx["model_dir"]), tokens=tokens).peak_allocated / 2**30


def check_rows(ctx, a) -> dict:
    import train_throughput as tt

    rows = []
    for name in a.rows:
        row = tt.run_row(name, a, ctx)
        if name == "ours":
            row["est_peak_gb"] = round(estimate_for(ctx, row), 2)
        rows.append(row)
    ctx["rows"] = rows
    finite = all(math.isfinite(r["heldout_loss"]) for r in rows)
    text = "; ".join(f"{r['row']} {r['trained_tok_s']:.0f} tok/s {r['peak_mem_gb']:.2f} GB" for r in rows)
    est = next((r["est_peak_gb"] for r in rows if "est_peak_gb" in r), None)
    return {"ok": finite, "detail": text + (f" (ours estimated {est:.2f} GB)" if est is not None else "")}


def check_one_step(ctx, dtype: str) -> dict:
    """One optimizer step of train.sft.train in `dtype`; the LoRA weights must be fp32 unless bf16."""
    from fine_tune_llm.train.sft import train

    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{dtype}-") as tmp:
        cfg = ctx["cfg"](dtype=dtype, max_steps=1, output_dir=f"{tmp}/run", metrics_dir=tmp, imgs_dir=tmp)
        result = train(cfg, resume=False)
        dtypes = sorted({str(p.dtype) for p in result.model.parameters() if p.requires_grad})
    want = "torch.bfloat16" if dtype == "bfloat16" else "torch.float32"
    ok = result.global_step == 1 and math.isfinite(result.train_loss or math.nan) and dtypes == [want]
    return {"ok": ok, "detail": f"step {result.global_step}, loss {result.train_loss}, LoRA dtypes {dtypes} "
                                f"(want {want})"}


def check_preference(ctx) -> dict:
    """SFT then the DPO stage on the check model, in-process: step times (training runtime less evaluations, over
    steps), the reference pass as the stage recorded it, and each stage's peak GPU memory. Rows go to
    bench_preference_cuda.csv, the GPU side of metrics/bench_preference_speed_cpu.csv."""
    from fine_tune_llm.train.lineage import preference_config
    from fine_tune_llm.train.preference import train_preference
    from fine_tune_llm.train.sft import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-dpo-") as tmp:
        for stage in ("sft", "dpo"):
            torch.cuda.reset_peak_memory_stats()
            common = {"max_steps": 8, "output_dir": f"{tmp}/{stage}", "metrics_dir": tmp, "imgs_dir": tmp}
            if stage == "sft":
                result = train(ctx["cfg"](**common), resume=False)
            else:
                # DPO's loss: the path with a reference pass (SimPO, the default, has none)
                result = train_preference(preference_config(f"{tmp}/sft", loss_type="sigmoid", **common),
                                          resume=False)
            state = json.loads((Path(tmp) / stage / "trainer_state.json").read_text())
            runtime = next(h["train_runtime"] for h in reversed(state["log_history"]) if "train_runtime" in h)
            evals = sum(h.get("eval_runtime", 0) for h in state["log_history"])
            rows.append({"row": f"{stage}_step", "seconds": round((runtime - evals) / state["global_step"], 3),
                         "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                         "loss": result.train_loss})
        ref = json.loads((Path(tmp) / "dpo" / "reference_logps.json").read_text())
        rows.append({"row": "ref_pass", "seconds": ref["seconds"], "pairs": len(ref["splits"]["train"]["chosen"])})
    ctx["preference_rows"] = rows
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    ok = all(math.isfinite(r.get("loss", 0) or math.nan) for r in rows[:2])
    return {"ok": ok, "detail": f"dpo_step / sft_step {ratio:.2f}; DPO peak {rows[1]['peak_mem_gb']} GB; "
                                f"reference pass {rows[2]['seconds']} s for {rows[2]['pairs']} pairs"}


def launch(ctx, config: str, processes: int, steps: int, *flags: str) -> dict:
    """`accelerate launch` of the training CLI on the check model; passes when every step ran."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-launch-") as tmp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "fine_tune_llm",
               "train", *train_flags(ctx, steps, tmp), *flags]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    ok = proc.returncode == 0 and f"trained {steps} steps" in proc.stdout
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:] if not ok else []
    return {"ok": ok, "detail": f"exit {proc.returncode}" + (": " + " | ".join(tail) if tail else "")}


def train_flags(ctx, steps: int, tmp: str) -> list[str]:
    return ["--preset", "gemma-2b-it", "--base-model", str(ctx["model_dir"]), "--dataset", str(REAL_DATA),
            "--data-samples", "96", "--max-length", str(ctx["max_length"]), "--batch-size", "2", "--grad-accum", "1",
            "--max-steps", str(steps), "--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "1000",
            "--no-resume", "--output-dir", f"{tmp}/run", "--metrics-dir", tmp, "--imgs-dir", tmp]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(ctx) -> dict | None:
    if torch.cuda.device_count() < 2:
        return None  # skipped: one GPU
    return launch(ctx, "multi_gpu_ddp.yaml", 2, 1)


# --- running and writing --------------------------------------------------------------------------------------

def run_check(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check; the others still run
        result = {"ok": False, "detail": f"{type(exc).__name__}: {str(exc)[:400]}"}
    torch.cuda.empty_cache()
    if result is None:
        result = {"ok": None, "detail": "skipped (needs two GPUs)"}
    row = {"check": name, "ok": result["ok"], "seconds": round(time.perf_counter() - t0, 1), "detail": result["detail"]}
    status = {True: "PASS", False: "FAIL", None: "SKIP"}[result["ok"]]
    print(f"[{status}] {name:<6} {row['seconds']:6.1f} s  {row['detail']}", flush=True)
    return row


def write_rows(path: Path, rows: list[dict], extra: dict | None = None) -> Path:
    """CSV with the union of the rows' columns (in first-seen order) plus `extra` on every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r)) + list(extra or {})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **(extra or {})})
    return path


def make_context(a) -> dict:
    import train_throughput as tt
    from transformers import GemmaConfig
    from trl.trainer.utils import compute_flops_per_token

    from fine_tune_llm.config import make_config

    tokenizer = tt.load_tokenizer()
    shape = QUICK_SHAPE if a.quick else GEMMA_2B_IT_SHAPE
    model_dir = build_model_dir(tokenizer, shape)
    train, evals, _ = tt.bench_data(tokenizer, a.steps * a.batch, a.eval_rows, a.max_length, a.seed)
    mean_len = round(sum(len(x) for x in train["input_ids"]) / len(train))
    config = GemmaConfig(**shape)
    base = {"base_model": str(model_dir), "dataset": str(REAL_DATA), "max_length": a.max_length, "data_samples": 96,
            "batch_size": 2, "grad_accum": 1, "logging_steps": 1, "eval_steps": 1000, "save_steps": 1000}
    return {"tokenizer": tokenizer, "model_dir": model_dir, "train": train, "eval_batches": tt.eval_batches(evals,
            tokenizer), "batch": a.batch, "max_length": a.max_length, "shape": shape,
            "cfg": lambda **kw: make_config("gemma-2b-it", **{**base, **kw}),
            "flops_per_token": tt.lora_flops_per_token(config, tt.LORA["r"], tt.answer_share(train), mean_len),
            "flops_per_token_6n": compute_flops_per_token(config, mean_len),
            "peak_bf16": tt.matmul_peak(torch.bfloat16)}


def checks(a, ctx) -> list[tuple[str, object, tuple]]:
    fsdp_flags = ("--gradient-checkpointing", "false")  # FSDP's own activation checkpointing replaces it
    return [("auto", check_auto, (ctx,)), ("grads", check_grads, (ctx,)), ("rows", check_rows, (ctx, a)),
            ("bf16", check_one_step, (ctx, "bfloat16")), ("fp16", check_one_step, (ctx, "float16")),
            ("dpo", check_preference, (ctx,)),
            ("fsdp", launch, (ctx, "fsdp_qlora.yaml", 1, 3, *fsdp_flags)), ("ddp", check_ddp, (ctx,))]


def main(argv=None) -> int:
    a = parse_args(argv)
    why = missing_requirements()
    if why:
        print(why, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    ctx = make_context(a)
    print(f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; model {ctx['shape']} "
          f"(built in the cache: {ctx['model_dir']}); setup {time.perf_counter() - t0:.0f} s", flush=True)
    results = [run_check(name, fn, *args) for name, fn, args in checks(a, ctx) if name not in a.skip]
    out = Path(a.out)
    extra = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": json.dumps(ctx["shape"])}
    written = [write_rows(out / "gpu_check_cuda.csv", results, extra)]
    if ctx.get("rows"):
        written.append(write_rows(out / "bench_train_throughput_cuda.csv", ctx["rows"], extra))
    if ctx.get("preference_rows"):
        written.append(write_rows(out / "bench_preference_cuda.csv", ctx["preference_rows"], extra))
    print(f"wrote {', '.join(map(str, written))}; whole run {time.perf_counter() - t0:.0f} s")
    return 1 if any(r["ok"] is False for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
