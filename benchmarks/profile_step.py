"""Where a training step of a real model goes: torch.profiler over a few steps of the package's own training path.

    .venv/bin/python benchmarks/profile_step.py --recipe previous --threads 1   # today's smollm2-135m preset
    .venv/bin/python benchmarks/profile_step.py --recipe proposed --threads 1   # with common.PROPOSED + runtime levers

SmolLM2-135M-Instruct (../shared GGUF), the real psychology rows, 8 rows per step, steps built exactly as
`fine-tune-llm train` builds them (model.loading.load_model/add_lora, train.sft.build_trainer). Prints the operators by self
CPU time, the same grouped into what they are (matmuls, attention softmax, dtype copies, elementwise, bitsandbytes
dequantization, optimizer, cross-entropy), and the largest operator shapes.
Findings: docs/results.md#where-a-step-goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (
    PROPOSED,
    REAL_DATA,
    RUNTIME_PROPOSED,
    SMOL_GGUF,
    apply_runtime,
    package_trainer,
    tokenized_splits,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS = [  # (group, operator-name fragments), first match wins
    ("bitsandbytes dequantize", ("bitsandbytes::",)),
    ("matmul (mm/bmm/addmm)", ("aten::mm", "aten::bmm", "aten::addmm")),
    ("attention softmax (+backward)", ("aten::_softmax",)),
    ("dtype copies / casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("elementwise (mul/add/silu/pow/...)", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt",
                                            "aten::neg", "aten::cat", "aten::sum", "aten::mean", "aten::div",
                                            "aten::fill_", "aten::sqrt", "aten::exp", "aten::sub", "aten::where")),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["previous", "proposed"], default="previous")
    p.add_argument("--set", default="{}", help="JSON of further TrainConfig overrides")
    p.add_argument("--model", default=str(SMOL_GGUF))
    p.add_argument("--steps", type=int, default=6, help="steps run; the first 2 are not profiled")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if not (Path(a.model).exists() and REAL_DATA.exists()):
        print("SKIPPED: needs the real model and data from ../shared")
        return 0
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback, set_seed

    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.loading import add_lora, load_model, load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = dict(PROPOSED) if a.recipe == "proposed" else {"quantization": "4bit", "padding_free": True}
    overrides.update(json.loads(a.set))
    run_dir = tempfile.mkdtemp(prefix="profile-step-")
    cfg = make_config("smollm2-135m", base_model=a.model, dataset=str(REAL_DATA), data_samples=2500,
                      max_steps=a.steps, output_dir=run_dir, metrics_dir=run_dir, imgs_dir=run_dir, logging_steps=1,
                      **{k: v for k, v in overrides.items() if k not in ("eval_steps", "save_steps")})
    tokenizer = load_tokenizer(cfg)
    data = tokenized_splits(cfg, tokenizer)
    set_seed(cfg.seed)
    model = add_lora(load_model(cfg), cfg)
    if a.recipe == "proposed":
        apply_runtime(model, RUNTIME_PROPOSED)
    trainer = package_trainer(cfg, model, tokenizer, data["train"], data["validation"].select(range(8)), run_dir)
    for k, v in {"eval_strategy": "no", "save_strategy": "no", "report_to": [], "disable_tqdm": True}.items():
        setattr(trainer.args, k, v)
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                          if "TensorBoard" not in type(c).__name__]
    times: list[float] = []

    class _Step(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t = time.perf_counter(), time.process_time()

        def on_step_end(self, *args, **kw):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))
            prof.step()

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 schedule=schedule(wait=1, warmup=1, active=max(1, a.steps - 2))) as prof:
        trainer.add_callback(_Step())
        trainer.train()
    print(f"recipe {a.recipe} {overrides}: threads {torch.get_num_threads()}")
    print("per step (wall s, CPU s):", [(round(w, 2), round(c, 2)) for w, c in times])
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    grouped: dict[str, float] = defaultdict(float)
    for e in averages:
        group = next((g for g, keys in GROUPS if any(e.key.startswith(k) for k in keys)), "other (autograd, "
                     "views, optimizer, python)")
        grouped[group] += e.self_cpu_time_total
    print("\nself CPU time by group:")
    for g, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<45} {100 * t / total:5.1f}%")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
