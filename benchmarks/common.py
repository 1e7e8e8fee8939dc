"""Measurement helpers shared by the benchmarks: machine description, matmul peak, memory, step timing."""

from __future__ import annotations

import csv
import gc
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fine_tune_llm.manifest import cpu_name
from fine_tune_llm.model.hardware import cpu_has_native_bf16

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "psychology-dataset" / "psychology_dataset.parquet"
GEMMA_TOKENIZER = SHARED / "models" / "gemma-tokenizer"
SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# The proposed smollm2-135m preset: changes to config.PRESETS["smollm2-135m"] measured here before the preset carries
# them (train_throughput.py --model: one ablation row per change; recipe_time.py: the whole job), applied on top of
# the package's preset. Landed in the preset since: padding_free False, quantization none (speed-neutral, the
# released weights), eval/save every 125 steps, then group_by_length and 4 x 2, then eager again (SDPA is slower
# for little memory on these short rows) and pad_to_multiple_of 16. What each bought:
# docs/results.md#why-each-preset-value. Still proposed: nothing.
PROPOSED: dict = {}
# Levers that are code, not config values. lora_nocast: peft casts every LoRA layer's input to the adapter's fp32
# dtype and bf16 autocast casts it back for the matmul; train.sft.train now skips the cast under autocast
# (train.sft.lora_inputs_uncast: exact, and faster: row ours+lora-cast). Kept here for the benchmarks that run the
# Trainer themselves rather than through train.sft.train.
RUNTIME_PROPOSED = {"lora_nocast": True}


def apply_runtime(model, levers: dict) -> None:
    """Apply the RUNTIME_PROPOSED levers to a LoRA model for training (undo with levers set to False)."""
    if "lora_nocast" in levers:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = not levers["lora_nocast"]


def tokenized_splits(cfg, tokenizer) -> dict:
    """training.prepare_data's tokenized splits (a PreparedData, or a (splits, tokenized) tuple before it)."""
    from fine_tune_llm.train.sft import prepare_data

    out = prepare_data(cfg, tokenizer)
    return out.tokenized if hasattr(out, "tokenized") else out[1]


def package_trainer(cfg, model, tokenizer, train, evals, run_dir):
    """training.build_trainer with a run directory (a RunDir where the package has one)."""
    from fine_tune_llm.train.sft import build_trainer

    try:
        from fine_tune_llm.run import RunDir

        run = RunDir.of(run_dir)
    except ImportError:
        run = Path(run_dir)
    return build_trainer(cfg, model, tokenizer, train, evals, run)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> dict[str, str]:
    """What ran the numbers, including how busy the machine was (a shared CPU makes wall times noisy)."""
    info = {"torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = cpu_description()
    info["python"] = platform.python_version()
    info["load_avg_1m"] = f"{load_average():.1f}"
    return info


def cpu_description() -> str:
    """The GPU's name, or the CPU's with the vector extension torch dispatches to and whether it multiplies bf16
    natively: two CPUs both named "AMD EPYC" differed many-fold per training step (docs/results.md#machines)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"CPU {cpu_name()} x{os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None,
              append: bool = False) -> Path:
    """A benchmark's rows to `path` (its folder made), with a header; `append` adds them to an existing file
    (the header only when the file is new). Columns: `columns`, else the first row's keys; keys outside them are
    left out."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and out.is_file())
    with open(out, "w" if new else "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return out


def rss_gb() -> float:
    """Resident memory of this process now, in GB (from /proc: no psutil needed)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s of a large square matmul in `dtype` on this device, measured now."""
    dev = device()
    n = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    best = 0.0
    end = time.perf_counter() + seconds
    a @ b  # warm-up
    while time.perf_counter() < end:
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Return freed memory to the OS between configurations, so each one's peak RSS is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from fine_tune_llm.train.trainers import release_freed_memory

    release_freed_memory()


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated memory (CUDA) while the block runs, in GB."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_gb = 0.0
        self._stop = threading.Event()

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, self._proc.memory_info().rss / 2**30)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak_gb = torch.cuda.max_memory_allocated() / 2**30


@dataclass
class StepLog:
    """Per optimizer step: wall and CPU seconds, and the tokens of the batches that step consumed."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # computed positions, padding included
    real: list[int] = field(default_factory=list)  # non-padding tokens
    trained: list[int] = field(default_factory=list)  # tokens with a loss (next-token labels != -100)
    loss: list[float] = field(default_factory=list)


class CountingCollator:
    """Wraps a data collator and records, per batch, computed positions, real tokens and trained tokens."""

    def __init__(self, collate, pad_token_id: int):
        self.collate = collate
        self.pad_token_id = pad_token_id
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(
            sum(len(e["input_ids"]) for e in examples))
        self.batches.append((ids.numel(), real, int((labels[:, 1:] != -100).sum())))
        return batch


def step_timer(log: StepLog, counter: CountingCollator, accum: int):
    """A TrainerCallback filling `log`: step k lasts from the end of step k-1 (or the start of training) to its
    own end, so it includes fetching and collating its batches, forward, backward and the optimizer."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            t, c = time.perf_counter(), time.process_time()
            log.wall.append(t - self.t)
            log.cpu.append(c - self.c)
            self.t, self.c = t, c
            k = len(log.wall) - 1
            batches = counter.batches[k * accum:(k + 1) * accum]
            log.positions.append(sum(b[0] for b in batches))
            log.real.append(sum(b[1] for b in batches))
            log.trained.append(sum(b[2] for b in batches))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.loss.append(float(logs["loss"]))

    return _Timer()
