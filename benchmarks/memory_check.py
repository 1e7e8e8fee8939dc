"""The memory estimate (`train --dry-run`) against a measured CPU training run of the same config.

    .venv/bin/python benchmarks/memory_check.py                                   # the tiny preset
    .venv/bin/python benchmarks/memory_check.py --base-model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

RSS is not VRAM (it holds the libraries too), so the measured figure is the peak of live tensor bytes during a
few training steps, from torch.profiler's allocation events, plus the parameters and 4-bit quantization state:
the same arithmetic the estimate makes for a GPU. Measured (estimate / measured): docs/results.md#memory-estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def static_bytes(model) -> int:
    import bitsandbytes as bnb

    total = sum(t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():  # quantization state (absmax, codes) is not a parameter
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None:
            qs = m.weight.quant_state
            total += qs.absmax.nbytes + qs.code.nbytes + (qs.state2.absmax.nbytes + qs.state2.code.nbytes
                                                          if qs.nested else 0)
    return total


def peak_live_bytes(prof) -> int:
    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    return max(n.extra_fields.total_allocated for n in walk(prof.profiler.kineto_results.experimental_event_tree())
               if n.tag.name == "Allocation")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default="tiny-gemma")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="/tmp/memory-check")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.loading import add_lora, load_model, load_tokenizer
    from fine_tune_llm.run import RunDir
    from fine_tune_llm.train import memory_estimate
    from fine_tune_llm.train.sft import build_trainer, prepare_data

    torch.set_num_threads(1)
    cfg = make_config("tiny", base_model=args.base_model, max_steps=args.steps, eval_steps=1000, save_steps=1000,
                      output_dir=f"{args.out}/run", metrics_dir=f"{args.out}/m", imgs_dir=f"{args.out}/i")
    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok)
    model = add_lora(load_model(cfg), cfg)
    trainer = build_trainer(cfg, model, tok, data.tokenized["train"], data.tokenized["validation"],
                            RunDir.of(cfg.output_dir))
    batches = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        batches.append((batch["input_ids"].numel(), int((batch["labels"][:, 1:] != -100).sum())))
        return batch

    trainer.data_collator = counting
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    measured = static_bytes(model) + peak_live_bytes(prof)
    est = memory_estimate.estimate(cfg, model.config, tokens=max(b[0] for b in batches),
                                   trained=max(b[1] for b in batches))
    print(est.summary())
    print(f"measured peak (parameters + quantization state + live tensors): {measured / 1e6:.1f} MB; estimate "
          f"{est.peak_allocated / 1e6:.1f} MB; estimate / measured = {est.peak_allocated / measured:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
