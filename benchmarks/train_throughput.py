"""Training speed per token: the naive recipe, TRL's defaults and this project's training path, in one run.

    .venv/bin/python benchmarks/train_throughput.py --threads 1 --repeats 2   # the Gemma-shaped CPU table (~9 min)
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --repeats 3 \
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   # the SmolLM2 table (~1.5 h)
    .venv/bin/python benchmarks/train_throughput.py --quick --rows ours        # smoke test of the script
On a CPU shared with other busy processes pass --threads 1: with two OpenMP threads a descheduled thread
leaves its sibling spinning at every barrier, so identical rows differ widely and run slower
(docs/results.md#levers-not-taken). 1 thread also gives clean CPU-seconds; the package keeps torch's default.

Same model, data, hyperparameters and hardware for every row; only the training machinery differs:
  naive        every example padded to --max-length, loss on all tokens, fp32 compute, no packing
               (transformers Trainer, the model with fp32 compute, peft's k-bit preparation when 4-bit);
  trl-default  TRL's SFTTrainer with its own defaults (padding to the longest row, gradient checkpointing,
               SDPA, TRL's fused LM head, fused AdamW) and the same dtype, quantization and LoRA as ours;
  ours         fine_tune_llm's training path (model.loading.load_model/add_lora, train.sft.build_trainer) with the
               CPU presets' settings on CPU and the gemma-2b-it preset's on CUDA;
  ours+X       ours with one change reverted: what that change buys.
Every row trains on the same rows in the same order with the same hyperparameters and the same answer-only loss
(trl-default: completion_only_loss=True, which TRL's default turns on only for prompt/completion columns); the
held-out loss is the mean answer-token NLL on fixed validation rows, and `ours-seed2` (another LoRA init seed) gives
its noise floor. Repeats interleave the rows (A B C A B C ...); the CSV holds every repeat and the medians.

Two models:
* the default, Gemma-shaped: a Gemma-architecture model sized for the machine (hidden 512, 8 layers, random
  weights), 4-bit NF4 as in real use, with Gemma's real 256k vocabulary; the data tokenized with gemma-2b-it's
  tokenizer (../shared). The LM head is ~81% of this model's FLOPs per token (gemma-2b-it: ~21%), so savings in the
  head weigh about 4x more here than on gemma-2b-it. `ours` is pinned to what this table measured (GEMMA_OURS).
  Writes metrics/bench_train_throughput_<device>.csv and metrics/bench_data_prep_<device>.csv.
* --model PATH: a real model (a HF folder, or a .gguf file rewritten once as bf16 safetensors as the package does),
  with its own tokenizer and chat template; `ours` is the smollm2-135m preset with the proposed values
  (common.PROPOSED) and code levers (common.RUNTIME_PROPOSED), batch 8 as in the preset, 20 timed steps.
  Writes metrics/bench_train_throughput_<device>_<model>.csv (SmolLM2: ..._cpu_smollm2.csv).

Measured: docs/results.md#training-throughput (both tables, where a step goes, levers measured and not taken).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (
    GEMMA_TOKENIZER,
    PROPOSED,
    REAL_DATA,
    REPO,
    RUNTIME_PROPOSED,
    CountingCollator,
    PeakMemory,
    StepLog,
    apply_runtime,
    device,
    load_average,
    machine,
    matmul_peak,
    package_trainer,
    release_memory,
    step_timer,
    tokenized_splits,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A Gemma-1 architecture (gemma-2b-it's) at a size two CPU cores train in minutes; multi-query attention as in
# gemma-2b. The vocabulary is the real one (set from the tokenizer).
BENCH_SHAPE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 1, "head_dim": 64}
QUICK_SHAPE = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 32}
# gemma-2b-it's published config, for the time-per-epoch estimate (no download needed).
GEMMA_2B_SHAPE = {"hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                  "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000}

# Each row: which recipe, and for `ours` rows the one TrainConfig setting changed from ours.
# The Gemma-shaped table (the default): `ours` pinned to what that table measured (4-bit, padding-free packing).
GEMMA_OURS = {"quantization": "4bit", "padding_free": True}
GEMMA_ROWS: dict[str, dict] = {
    "naive": {"kind": "naive"},
    "trl-default": {"kind": "trl"},
    "ours": {"kind": "ours"},
    "ours+trl-head": {"kind": "ours", "loss_impl": "trl"},
    "ours+padding": {"kind": "ours", "padding_free": False},
    "ours+sdpa": {"kind": "ours", "attn_implementation": "sdpa"},
    "ours+fp32-frozen": {"kind": "ours", "upcast_frozen": True},
    "ours+checkpointing": {"kind": "ours", "gradient_checkpointing": True},
    "ours+dropout0.05": {"kind": "ours", "lora_dropout": 0.05},
    "ours-seed2": {"kind": "ours", "seed": 2},
}
# A real model (--model): `ours` is the package's smollm2-135m preset with PROPOSED and RUNTIME_PROPOSED (common.py);
# each ablation reverts one of them, or one of the package's earlier choices.
REAL_ROWS: dict[str, dict] = {
    "naive": {"kind": "naive"},
    "trl-default": {"kind": "trl"},
    "ours": {"kind": "ours"},
    "ours+packing": {"kind": "ours", "padding_free": True},
    "ours+4bit": {"kind": "ours", "quantization": "4bit"},
    "ours+lora-cast": {"kind": "ours", "runtime": {"lora_nocast": False}},
    "ours+sdpa": {"kind": "ours", "attn_implementation": "sdpa"},
    "ours+trl-head": {"kind": "ours", "loss_impl": "trl"},
    "ours+checkpointing": {"kind": "ours", "gradient_checkpointing": True},
    "ours-seed2": {"kind": "ours", "seed": 2},
}
ROWS: dict[str, dict] = {**GEMMA_ROWS, **REAL_ROWS}
ABOUT = {
    "ours+packing": "padding-free packing (the previous preset) instead of padding each batch to its longest row",
    "ours+4bit": "4-bit NF4 frozen weights (the previous preset) instead of bf16",
    "ours+lora-cast": "peft's fp32 cast of every LoRA input kept (under bf16 autocast)",
    "ours+trl-head": "TRL's fused LM head instead of answer-only logits",
    "ours+padding": "pad each batch to its longest row instead of padding-free packing",
    "ours+sdpa": "SDPA attention instead of eager",
    "ours+fp32-frozen": "peft's fp32 upcast of frozen embeddings/norms kept",
    "ours+checkpointing": "gradient checkpointing on",
    "ours+dropout0.05": "LoRA dropout 0.05 (the gemma-2b-it preset's) instead of 0",
    "ours-seed2": "ours with another LoRA init seed: the loss noise floor",
}
# The default run; ours+dropout0.05 (the gemma-2b-it preset's dropout) only on request (--rows).
DEFAULT_ROWS = [n for n in GEMMA_ROWS if n != "ours+dropout0.05"]
DEFAULT_REAL_ROWS = list(REAL_ROWS)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


# --- model and data ---------------------------------------------------------------------------------------

def bench_model_dir(tokenizer, shape: dict) -> Path:
    """A randomly initialised Gemma with the real vocabulary, saved once (bf16 safetensors) in the cache."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from fine_tune_llm.model.tiny import cache_root

    key = hashlib.sha256(json.dumps([shape, len(tokenizer), "v1"], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"bench-gemma-{key}"
    if (target / "model.safetensors").is_file():
        return target
    config = GemmaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, max_position_embeddings=2048, **shape)
    torch.manual_seed(0)
    GemmaForCausalLM(config).to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    return target


def load_tokenizer(model_dir: Path | None = None):
    """gemma-2b-it's tokenizer for the Gemma-shaped model; a real model's own (with its chat template) otherwise,
    loaded as the package loads it."""
    if model_dir is not None:
        from fine_tune_llm.config import make_config
        from fine_tune_llm.model.loading import load_tokenizer as package_tokenizer

        return package_tokenizer(make_config("smollm2-135m", base_model=str(model_dir)))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GEMMA_TOKENIZER)
    tok.padding_side = "right"
    return tok


def real_model_dir(path: str) -> Path:
    """A HF folder as is; a .gguf file rewritten once as a bf16 safetensors folder, as the package does."""
    source = Path(path).expanduser()
    if source.suffix == ".gguf":
        from fine_tune_llm.model.loading import gguf_as_safetensors

        return Path(gguf_as_safetensors(source.parent, source.name))
    return source


def model_tag(path: str) -> str:
    name = Path(path).name.lower()
    return "smollm2" if "smollm2" in name else "".join(c if c.isalnum() else "-" for c in Path(path).stem.lower())


def bench_data(tokenizer, n_train: int, n_eval: int, max_length: int, seed: int = 0):
    """The first n_train rows of a seeded shuffle of the real train split (every row trains in the same order),
    and n_eval validation rows for the held-out loss."""
    from fine_tune_llm.config import make_config

    cfg = make_config("gemma-2b-it", dataset=str(REAL_DATA), max_length=max_length)
    data = tokenized_splits(cfg, tokenizer)
    train = data["train"].shuffle(seed=seed).select(range(n_train)).select_columns(["input_ids", "completion_mask"])
    evals = data["validation"].select(range(n_eval)).select_columns(["input_ids", "completion_mask"])
    return train, evals, data


def eval_batches(evals, tokenizer, batch_size: int = 8):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    rows = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"],
                                                                                       r["completion_mask"])]}
            for r in evals]
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def heldout_loss(model, batches, bf16: bool) -> float:
    """Mean answer-token NLL on fixed validation rows, computed the same way for every row of the table."""
    from fine_tune_llm.train.answer_loss import answer_only_nll

    dev = device()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for b in batches:
            nll, _, targets = answer_only_nll(model, {k: v.to(dev) for k, v in b.items()})
            total += float(nll.sum())
            count += targets.numel()
    model.train(was_training)
    return total / count


# --- the three recipes ------------------------------------------------------------------------------------

def common_args(a, run_dir: str) -> dict:
    """Hyperparameters every row shares (so the loss after the same tokens is comparable)."""
    return {"output_dir": run_dir, "learning_rate": a.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "max_grad_norm": 1.0, "max_steps": a.steps, "seed": a.seed, "data_seed": a.seed, "logging_steps": 1,
            "save_strategy": "no", "eval_strategy": "no", "report_to": [], "disable_tqdm": True,
            "train_sampling_strategy": "sequential", "use_cpu": device().type == "cpu"}


def load_base(model_dir: Path, dtype: torch.dtype, quantization: str, **kwargs):
    """The frozen base model as `ours` has it: 4-bit NF4 with `dtype` compute, quantized as the project does
    (model.loading.quantization_config), or plain `dtype` weights when ours does not quantize."""
    from transformers import AutoModelForCausalLM

    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.loading import device_map, guard_cpu_4bit, quantization_config

    qconfig = quantization_config(make_config(ours_preset(), quantization=quantization,
                                              dtype=str(dtype).removeprefix("torch.")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map(),
                                                 quantization_config=qconfig, **kwargs)
    guard_cpu_4bit(model)
    return model


def lora_config():
    from peft import LoraConfig

    from fine_tune_llm.config import ALL_LINEAR

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=list(ALL_LINEAR), bias="none", task_type="CAUSAL_LM")


def build_naive(spec, a, ctx, run_dir):
    """The tutorial recipe: pad to max_length, labels = inputs (loss on prompt and answer), fp32 compute."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from fine_tune_llm.model.loading import guard_cpu_4bit

    model = load_base(ctx["model_dir"], torch.float32, ctx.get("quantization", "4bit"))
    if ctx.get("quantization", "4bit") != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config())
    guard_cpu_4bit(model)
    pad = ctx["tokenizer"].pad_token_id

    def collate(examples):
        ids = torch.full((len(examples), a.max_length), pad)
        for i, e in enumerate(examples):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask = (ids != pad).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    micro = a.naive_micro_batch
    args = TrainingArguments(per_device_train_batch_size=micro, gradient_accumulation_steps=a.batch // micro,
                             bf16=False, remove_unused_columns=False, optim="adamw_torch",
                             **common_args(a, run_dir))
    trainer = Trainer(model=model, args=args, train_dataset=ctx["train"], data_collator=collate)
    return trainer, False, a.batch // micro


def build_trl_default(spec, a, ctx, run_dir):
    """What a knowledgeable user runs with TRL alone: SFTTrainer + peft_config on the 4-bit bf16 model."""
    from trl import SFTConfig, SFTTrainer

    model = load_base(ctx["model_dir"], torch.bfloat16, ctx.get("quantization", "4bit"))
    # completion_only_loss=True: TRL's default (None) turns it on only for prompt/completion columns; with
    # pre-tokenized input_ids + completion_mask (the same rows ours gets) None would train on the prompt too.
    args = SFTConfig(per_device_train_batch_size=a.batch, completion_only_loss=True, **common_args(a, run_dir))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ctx["train"], processing_class=ctx["tokenizer"],
                         peft_config=lora_config())
    return trainer, True, 1


def ours_preset() -> str:
    return "gemma-2b-it" if device().type == "cuda" else "smollm2-135m"


def ours_config(spec, a, ctx, run_dir):
    from fine_tune_llm.config import make_config

    preset = ours_preset()
    overrides = {k: v for k, v in spec.items() if k not in ("kind", "runtime")}
    # The preset's machinery; the hyperparameters every row shares (LoRA shape and dropout included).
    shared = {"seed": a.seed, "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
              **ctx.get("ours_base", {})}
    return make_config(preset, base_model=str(ctx["model_dir"]), dataset=str(REAL_DATA), requires_cuda=False,
                       learning_rate=a.lr, lr_scheduler="constant", warmup_ratio=0.0, batch_size=a.batch,
                       grad_accum=1, max_steps=a.steps, max_length=a.max_length, logging_steps=1,
                       eval_steps=10**9, save_steps=10**9, output_dir=run_dir, metrics_dir=run_dir, imgs_dir=run_dir,
                       **{**shared, **overrides})


def build_ours(spec, a, ctx, run_dir):
    from transformers import set_seed

    from fine_tune_llm.model.loading import add_lora, load_model

    cfg = ours_config(spec, a, ctx, run_dir)
    set_seed(cfg.seed)
    model = add_lora(load_model(cfg), cfg)
    apply_runtime(model, {**ctx.get("ours_runtime", {}), **spec.get("runtime", {})})
    trainer = package_trainer(cfg, model, ctx["tokenizer"], ctx["train"], ctx["train"].select(range(1)), run_dir)
    # The benchmark's own settings on top of the project's: fixed order, no evaluation, no saving.
    for k, v in {"train_sampling_strategy": "sequential", "eval_strategy": "no", "save_strategy": "no",
                 "report_to": [], "disable_tqdm": True}.items():
        setattr(trainer.args, k, v)
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                          if "TensorBoard" not in type(c).__name__]
    return trainer, cfg.dtype == "bfloat16", 1


BUILDERS = {"naive": build_naive, "trl": build_trl_default, "ours": build_ours}


# --- running and summarising ------------------------------------------------------------------------------

def run_row(name: str, a, ctx) -> dict:
    from transformers import set_seed

    spec = ROWS[name]
    release_memory()
    set_seed(spec.get("seed", a.seed))
    load_before = load_average()
    log = StepLog()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as run_dir, PeakMemory() as mem:
        trainer, bf16, accum = BUILDERS[spec["kind"]](spec, a, ctx, run_dir)
        counter = CountingCollator(trainer.data_collator, ctx["tokenizer"].pad_token_id)
        trainer.data_collator = counter
        trainer.add_callback(step_timer(log, counter, accum))
        trainer.train()
        loss_after = heldout_loss(trainer.model, ctx["eval_batches"], bf16)
        del trainer
    release_memory()
    row = summarise(name, log, a.warmup, ctx)
    row.update(peak_mem_gb=round(mem.peak_gb, 2), heldout_loss=round(loss_after, 4),
               load_avg=round((load_before + load_average()) / 2, 1))
    print(f"  {name:<20} {row['trained_tok_s']:8.1f} trained tok/s  {row['trained_tok_cpu_s']:7.1f} per CPU-s  "
          f"loss {row['heldout_loss']:.4f}  ({sum(log.wall):.0f} s, load {row['load_avg']})", flush=True)
    return row


def medians(runs: list[dict], names: list[str]) -> list[dict]:
    """Per row, the median of every numeric column over the repeats (the row itself when run once)."""
    out = []
    for name in names:
        mine = [r for r in runs if r["row"] == name]
        row = {k: v for k, v in mine[0].items() if k != "repeat"}
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = round(statistics.median(r[k] for r in mine), 4)
        out.append({"repeat": "median" if len(mine) > 1 else 1, **row})
    return out


def rate(tokens: list[int], seconds: list[float]) -> float:
    return sum(tokens) / sum(seconds) if sum(seconds) > 0 else float("nan")


def summarise(name: str, log: StepLog, warmup: int, ctx) -> dict:
    sl = slice(warmup, None)
    wall, cpu, trained, real, pos = log.wall[sl], log.cpu[sl], log.trained[sl], log.real[sl], log.positions[sl]
    half = max(1, len(wall) // 2)
    real_tps = rate(real, wall)
    return {
        "row": name, "about": ABOUT.get(name, ""), "timed_steps": len(wall),
        "trained_tok_s": round(rate(trained, wall), 2),
        "trained_tok_s_median_step": round(statistics.median(t / w for t, w in zip(trained, wall)), 2),
        "all_tok_s": round(real_tps, 2),
        "trained_tok_cpu_s": round(rate(trained, cpu), 2),
        "padding_share": round(1 - sum(real) / sum(pos), 3),
        "first_window_trained_tok_s": round(rate(trained[:half], wall[:half]), 2),
        "last_window_trained_tok_s": round(rate(trained[-half:], wall[-half:]), 2),
        "mfu": round(ctx["flops_per_token"] * real_tps / ctx["peak_bf16"], 4),
        "train_loss_last": round(log.loss[-1], 4) if log.loss else float("nan"),
        "trained_tokens": sum(log.trained), "seconds": round(sum(wall), 1),
    }


# --- data preparation speed -------------------------------------------------------------------------------

PREP_SNIPPET = r"""
import json, time
t0 = time.perf_counter()
from transformers import AutoTokenizer
from fine_tune_llm.config import make_config
from fine_tune_llm.data.rows import load_splits
from fine_tune_llm.train.sft import tokenize_split
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(%(tok)r)
t2 = time.perf_counter()
cfg = make_config("gemma-2b-it", dataset=%(data)r)
splits = load_splits(cfg.dataset, cfg.seed, None, cfg.val_fraction, cfg.test_fraction)
t3 = time.perf_counter()
data = {k: tokenize_split(v, tok, cfg, k) for k, v in splits.items()}
t4 = time.perf_counter()
print("PREP " + json.dumps({"imports_s": t1 - t0, "tokenizer_s": t2 - t1, "load_split_s": t3 - t2,
                           "tokenize_s": t4 - t3, "rows": sum(len(v) for v in splits.values())}))
"""


def data_prep(tokenizer) -> list[dict]:
    """Load + template + tokenize + split all rows: cold (fresh process, empty datasets cache) and warm."""
    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.train.sft import tokenize_split

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", PREP_SNIPPET % {"tok": str(GEMMA_TOKENIZER),
                                                                     "data": str(REAL_DATA)}],
                             capture_output=True, text=True, env=env, cwd=REPO, check=True)
        cold = json.loads(next(line[5:] for line in out.stdout.splitlines() if line.startswith("PREP ")))
    rows.append({"phase": "cold (new process)", **cold})
    cfg = make_config("gemma-2b-it", dataset=str(REAL_DATA))
    t2 = time.perf_counter()
    splits = load_splits(cfg.dataset, cfg.seed, None, cfg.val_fraction, cfg.test_fraction)
    t3 = time.perf_counter()
    for k, v in splits.items():
        tokenize_split(v, tokenizer, cfg, k)
    t4 = time.perf_counter()
    rows.append({"phase": "warm (same process)", "imports_s": 0.0, "tokenizer_s": 0.0, "load_split_s": t3 - t2,
                 "tokenize_s": t4 - t3, "rows": sum(len(v) for v in splits.values())})
    for r in rows:
        r["total_s"] = r["imports_s"] + r["tokenizer_s"] + r["load_split_s"] + r["tokenize_s"]
        for k in list(r):
            if k.endswith("_s"):
                r[k] = round(r[k], 2)
    return rows


# --- report -----------------------------------------------------------------------------------------------

def lora_flops_per_token(config, r: int, answer_share: float, seq_len: int) -> float:
    """FLOPs one token of LoRA training on answers needs, from the model's shapes alone (no recipe's extras):

        4 x frozen   frozen projections: forward (2 x params) + input gradient (2 x params); no weight gradient,
                     the weights are frozen
      + 6 x lora     LoRA A and B: forward + input gradient + weight gradient
      + 3 x attn     attention scores and values, 2 x 2 x q-width x seq_len forward (TRL's convention: the full
                     row, not the causal half), x3 with its backward
      + 4 x V x h x answer_share
                     the LM head forward + input gradient (tied, frozen: no weight gradient) only at the positions
                     that carry a loss, which is where `ours` runs it

    MFU = this x (real tokens/s) / the measured bf16 matmul peak. Work a recipe adds on top (padding, the head at
    prompt positions, recomputation under checkpointing, fp32 compute) is not useful work and is not counted, so MFU
    is a fraction <= 1 by construction and compares rows. The usual 6N count (used before: `mfu_6n` = 1.13 on the
    Gemma-shaped model) adds weight gradients LoRA never computes and the LM head at every position: work this
    recipe never needs, hence an impossible value above 1."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    frozen = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(r * (i + o) for i, o in shapes)
    attention = layers * 2 * 2 * q * seq_len
    return 4 * frozen + 6 * lora + 3 * attention + 4 * config.vocab_size * h * answer_share


def answer_share(ds) -> float:
    return sum(sum(m) for m in ds["completion_mask"]) / sum(len(x) for x in ds["input_ids"])


def epoch_estimate(rows: list[dict], ctx) -> list[str]:
    """gemma-2b-it, one epoch of the train split, at the FLOP rate `ours` sustained here. An estimate."""
    from transformers import GemmaConfig

    ours = next((r for r in rows if r["row"] == "ours"), None)
    if ours is None or ctx.get("real"):
        return []
    train = ctx["all_data"]["train"]
    lengths = [len(x) for x in train["input_ids"]]
    tokens, share, mean_len = sum(lengths), answer_share(train), round(sum(lengths) / len(lengths))
    f2b = lora_flops_per_token(GemmaConfig(**GEMMA_2B_SHAPE), LORA["r"], share, mean_len)
    achieved = ours["all_tok_s"] * ctx["flops_per_token"]
    seconds = tokens * f2b / achieved
    return [
        (f"ESTIMATE - gemma-2b-it, one epoch of the train split on this machine ({device_tag()}), at the FLOP rate "
        f"`ours` sustained on the bench model:"),
        (f"  train split: {len(lengths):,} rows = {tokens:,} tokens, {share:.0%} of them trained (answers); "
        f"padding-free, so no padding is computed"),
        (f"  gemma-2b-it LoRA r={LORA['r']} training FLOPs/token (lora_flops_per_token, mean length {mean_len}): "
        f"{f2b / 1e9:.2f} GFLOP"),
        (f"  ours sustained: {ours['all_tok_s']:.1f} tok/s x {ctx['flops_per_token'] / 1e9:.3f} GFLOP/token = "
        f"{achieved / 1e9:.1f} GFLOP/s ({ours['mfu']:.0%} of the measured {ctx['peak_bf16'] / 1e9:.0f} GFLOP/s "
        f"bf16 matmul peak)"),
        (f"  {tokens:,} tokens x {f2b / 1e9:.2f} GFLOP / {achieved / 1e9:.1f} GFLOP/s = {seconds:,.0f} s = "
        f"{seconds / 3600:.1f} h per epoch. Assumes gemma-2b-it's matmuls run as efficiently as the bench "
        f"model's (mostly its LM head); its 4-bit layers dequantize ~66x more weights per token, so read it as "
        f"a lower bound."),
    ]


def print_table(rows: list[dict]) -> None:
    cols = [("row", 20, "s"), ("trained_tok_s", 9, ".1f"), ("trained_tok_s_median_step", 9, ".1f"),
            ("all_tok_s", 9, ".1f"), ("trained_tok_cpu_s", 9, ".1f"), ("padding_share", 6, ".0%"),
            ("peak_mem_gb", 6, ".2f"), ("heldout_loss", 8, ".4f"), ("train_loss_last", 8, ".3f"),
            ("mfu", 6, ".1%"), ("first_window_trained_tok_s", 8, ".1f"), ("last_window_trained_tok_s", 8, ".1f")]
    heads = ["row", "trained/s", "median/s", "all/s", "tr/CPU-s", "pad", "peakGB", "heldout", "trainL",
             "MFU", "first/s", "last/s"]
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, (_, w, _)) in enumerate(zip(heads, cols))))
    for r in rows:
        print(" ".join(f"{r[k]:<{w}{f}}" if i == 0 else f"{r[k]:>{w}{f}}" for i, (k, w, f) in enumerate(cols)))


def paired(runs: list[dict], a: str, b: str, key: str) -> float:
    """Median over repeats of row a / row b measured in the same repeat (side by side, same machine load)."""
    per = {}
    for r in runs:
        per.setdefault(r["repeat"], {})[r["row"]] = r[key]
    values = [v[a] / v[b] for v in per.values() if a in v and b in v and v[b]]
    return statistics.median(values) if values else float("nan")


def ratios(rows: list[dict], runs: list[dict] | None = None) -> list[str]:
    by = {r["row"]: r for r in rows}
    runs = runs or [{"repeat": 1, **r} for r in rows]
    out = []
    if "ours" not in by:
        return out
    for peer in ("trl-default", "naive"):
        if peer in by:
            o, p = by["ours"], by[peer]
            out.append(f"ours / {peer}: {o['trained_tok_s'] / p['trained_tok_s']:.2f}x trained tokens/s (wall; "
                       f"median of per-repeat ratios {paired(runs, 'ours', peer, 'trained_tok_s'):.2f}x), "
                       f"{o['trained_tok_cpu_s'] / p['trained_tok_cpu_s']:.2f}x per CPU-second (per-repeat "
                       f"{paired(runs, 'ours', peer, 'trained_tok_cpu_s'):.2f}x); held-out loss "
                       f"{o['heldout_loss']:.4f} vs {p['heldout_loss']:.4f}")
    for name, r in by.items():
        if name.startswith("ours+"):
            o = by["ours"]
            out.append(f"{name:<20} ours is {o['trained_tok_s'] / r['trained_tok_s']:.2f}x (wall), "
                       f"{o['trained_tok_cpu_s'] / r['trained_tok_cpu_s']:.2f}x (CPU) faster than with "
                       f"{r['about']}")
    if "ours-seed2" in by:
        out.append(f"loss noise floor (ours, two LoRA seeds): |{by['ours']['heldout_loss']:.4f} - "
                   f"{by['ours-seed2']['heldout_loss']:.4f}| = "
                   f"{abs(by['ours']['heldout_loss'] - by['ours-seed2']['heldout_loss']):.4f}")
    return out


def write_csv(path: Path, rows: list[dict], extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) + list(extra)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **extra})


def device_tag() -> str:
    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a real model (a HF folder or a .gguf file) instead of the Gemma-shaped one: its own tokenizer "
                        "and chat template, and the real-model rows")
    p.add_argument("--rows", default=None, help=f"comma-separated, in order, from: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per row, the first --warmup untimed (default 3; 21 with --model)")
    p.add_argument("--repeats", type=int, default=1, help="run all rows this many times; report medians")
    p.add_argument("--warmup", type=int, default=1, help="steps excluded from the timings")
    p.add_argument("--batch", type=int, default=None, help="sequences per optimizer step, every row "
                   "(default 4; 8 with --model, the smollm2-135m preset's)")
    p.add_argument("--naive-micro-batch", type=int, default=2, help="naive: micro-batch (accumulated to --batch)")
    p.add_argument("--max-length", type=int, default=256, help="naive pads to this (longest real row: 162)")
    p.add_argument("--lr", type=float, default=1e-3, help="high enough that a few steps move the loss")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-rows", type=int, default=None,
                   help="validation rows for the held-out loss (default 8; 48 with --model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a busy machine 1 thread keeps CPU-seconds clean: "
                        "with 2, a thread spinning at a barrier for a descheduled sibling counts as work")
    p.add_argument("--quick", action="store_true", help="small model, 2 timed steps: checks the script runs")
    p.add_argument("--no-data-prep", action="store_true", help="skip the data preparation timing")
    p.add_argument("--out", default=str(REPO / "metrics"), help="where bench_*.csv go")
    a = p.parse_args(argv)
    real = a.model is not None
    a.steps = a.steps or (21 if real else 3)
    a.batch = a.batch or (8 if real else 4)
    a.eval_rows = a.eval_rows or (48 if real else 8)
    a.rows = a.rows or ",".join(DEFAULT_REAL_ROWS if real else DEFAULT_ROWS)
    needed = [REAL_DATA] + ([Path(a.model)] if real else [GEMMA_TOKENIZER])
    missing = [str(x) for x in needed if not x.exists()]
    if missing:
        print(f"SKIPPED: needs the real data and model/tokenizer from ../shared (missing: {', '.join(missing)})")
        return 0
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    if device().type == "cpu":
        print("No GPU in this run: every number below is CPU (bf16 autocast, bitsandbytes CPU 4-bit).")
    from transformers import AutoConfig, GemmaConfig

    from fine_tune_llm.config import make_config

    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    info = machine()
    if real:
        model_dir = real_model_dir(a.model)
        tokenizer = load_tokenizer(model_dir)
        model_config = AutoConfig.from_pretrained(model_dir)
        # ours = the package's preset + the proposed preset values (minus the job's eval/save cadence) + runtime levers
        ours_base = {k: v for k, v in PROPOSED.items() if k not in ("eval_steps", "save_steps")}
        ours_runtime = dict(RUNTIME_PROPOSED)
        describe = f"{model_config.model_type} from {a.model}"
        shape = {k: getattr(model_config, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                             "num_attention_heads", "num_key_value_heads", "head_dim")}
    else:
        tokenizer = load_tokenizer()
        shape = QUICK_SHAPE if a.quick else BENCH_SHAPE
        model_dir = bench_model_dir(tokenizer, shape)
        model_config = GemmaConfig(vocab_size=len(tokenizer), **shape)
        ours_base, ours_runtime = dict(GEMMA_OURS), {}
        describe = f"Gemma {shape}, random weights"
    quantization = make_config(ours_preset(), **ours_base).quantization
    train, evals, all_data = bench_data(tokenizer, a.steps * a.batch, a.eval_rows, a.max_length, a.seed)
    mean_len = round(sum(len(x) for x in train["input_ids"]) / len(train))
    ctx = {"tokenizer": tokenizer, "model_dir": model_dir, "train": train, "all_data": all_data, "real": real,
           "quantization": quantization, "ours_base": ours_base, "ours_runtime": ours_runtime,
           "eval_batches": eval_batches(evals, tokenizer),
           "flops_per_token": lora_flops_per_token(model_config, LORA["r"], answer_share(train), mean_len),
           "peak_bf16": matmul_peak(torch.bfloat16), "peak_fp32": matmul_peak(torch.float32)}
    print(f"machine: {info}")
    print(f"model: {describe}, vocab {len(tokenizer):,}, frozen weights {quantization if quantization != 'none' else 'bf16'}"
          f" in every row; LoRA r={LORA['r']} all linear layers; {a.steps} steps x {a.batch} sequences (first "
          f"{a.warmup} untimed), lr {a.lr}; ours = preset {ours_preset()} + {ours_base} + runtime {ours_runtime}")
    print(f"matmul peak now: bf16 {ctx['peak_bf16'] / 1e9:.1f} GFLOP/s, fp32 {ctx['peak_fp32'] / 1e9:.1f} GFLOP/s")
    print(f"MFU = FLOPs/token x real tokens/s / bf16 peak (the larger of the peaks measured before and after the rows),"
          f" with the FLOPs LoRA training on answers needs ({ctx['flops_per_token'] / 1e9:.3f} GFLOP/token, "
          f"lora_flops_per_token: frozen weights get no gradient, the LM head runs at answer positions only)")
    tag = device_tag() + (f"_{model_tag(a.model)}" if real else "") + ("-quick" if a.quick else "")
    runs = []
    for r in range(a.repeats):  # repeats interleave the rows, so a change in the machine's load hits them all
        if a.repeats > 1:
            print(f"repeat {r + 1}/{a.repeats}")
        for name in names:
            runs.append({"repeat": r + 1, **run_row(name, a, ctx)})
            write_csv(Path(a.out) / f"bench_train_throughput_{tag}.partial.csv", runs, {"rows_done": len(runs)})
    ctx["peak_bf16_end"] = matmul_peak(torch.bfloat16)
    peak = max(ctx["peak_bf16"], ctx["peak_bf16_end"])
    for run in runs:  # MFU against the better of the two peaks: a peak measured while busy would flatter the rows
        run["mfu"] = round(ctx["flops_per_token"] * run["all_tok_s"] / peak, 4)
    rows = medians(runs, names)
    print()
    if a.repeats > 1:
        print(f"medians over {a.repeats} repeats:")
    print_table(rows)
    print()
    for line in ratios(rows, runs) + epoch_estimate(rows, ctx):
        print(line)
    extra = {"device": info["device"], "threads": info["threads"], "steps": a.steps, "batch": a.batch,
             "model": (Path(a.model).name + " " if real else "") + json.dumps(shape), "vocab": len(tokenizer),
             "flops_per_token": round(ctx["flops_per_token"]), "peak_bf16_gflops": round(peak / 1e9, 1),
             "peak_fp32_gflops": round(ctx["peak_fp32"] / 1e9, 1)}
    out = Path(a.out)
    write_csv(out / f"bench_train_throughput_{tag}.csv", rows + (runs if a.repeats > 1 else []), extra)
    if not a.no_data_prep and not real:
        prep = data_prep(tokenizer)
        print()
        for r in prep:
            print(f"data prep {r['phase']:<20}: {r['total_s']:6.2f} s for {r['rows']:,} rows (imports "
                  f"{r['imports_s']:.2f}, tokenizer load {r['tokenizer_s']:.2f}, load+check+split "
                  f"{r['load_split_s']:.2f}, template+tokenize {r['tokenize_s']:.2f})")
        print("  (tokenized splits are in-memory datasets: datasets writes no cache file for them, so 'warm' is a "
              "warm process - imports, tokenizer and OS file cache - not an on-disk datasets cache)")
        write_csv(out / f"bench_data_prep_{tag}.csv", prep, {"device": info["device"]})
    print(f"\nwrote {out}/bench_*_{tag}.csv; whole run {time.perf_counter() - t_start:.0f} s, "
          f"load average now {load_average():.1f}, bf16 peak at the end {ctx['peak_bf16_end'] / 1e9:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
