"""Does a merged model compute what base + adapter computed? Logits on held-out prompts, and eval loss.

All numbers are computed in float32 one sequence at a time (no padding), so the differences measure the
weights - the merge and its rounding to bf16 - and not batch shapes or bf16 arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..data.chat_template import build_messages, encode_batch, render_prompt
from ..errors import DataError
from ..run import RunDir

# Stated tolerances, set from measurements (tiny preset and SmolLM2-135M; numbers in the release tests).
# Merges into bf16 or dequantized NF4 weights moved the logits by 0.2-4% of the adapter's own effect on them;
# PEFT's merge into the 4-bit weights by 10% (tiny) to 100% (SmolLM2: the adapter's effect gone, eval loss
# worse than without it). Logits vary in scale between models, so the main test is relative.
EFFECT_RTOL = 0.05  # mean |logit difference| / mean |logit change the adapter makes|
LOSS_ATOL = 0.01  # |eval loss difference| in nats per answer token
LOGIT_ATOL = 1.0  # largest |logit difference| anywhere: catches one broken layer that averages would hide


@dataclass
class Probe:
    """What the parity check runs: held-out prompts (test split) and held-out answers (validation split)."""

    prompts: list[list[int]]
    rows: list[tuple[list[int], list[int]]]  # (input_ids, completion_mask)
    prompt_rows: list[int]
    eval_rows: list[int]


def build_probe(run: RunDir, cfg: TrainConfig, tokenizer, n_prompts: int = 4, n_eval: int = 32) -> Probe:
    """Prompts from the run's saved test split, answers from its validation split."""
    splits = run.load_splits()
    held_out = splits["test"] or splits["validation"]
    evals = splits["validation"] or splits["test"]
    if not held_out:
        raise DataError(f"{cfg.dataset}: no held-out rows (val_fraction/test_fraction are 0) for the parity check")
    questions = list(dict.fromkeys(r["question"] for r in held_out))[:n_prompts]
    prompts = [tokenizer(render_prompt(tokenizer, build_messages(q, cfg.system_prompt)),
                         add_special_tokens=False)["input_ids"] for q in questions]
    chosen = evals[:n_eval]
    enc = encode_batch(tokenizer, [build_messages(r["question"], cfg.system_prompt) for r in chosen],
                       [r["answer"] for r in chosen], cfg.max_length)
    rows = [(ids, mask) for ids, mask, s in zip(enc["input_ids"], enc["completion_mask"], enc["status"])
            if s != "too_long"]
    return Probe(prompts, rows, [r["row"] for r in held_out[:n_prompts]], [r["row"] for r in chosen])


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


@torch.inference_mode()
def measure(model, probe: Probe) -> dict[str, Any]:
    """Logits at every prompt position (float32, on CPU) and the token-weighted loss on the eval answers."""
    model.eval()
    dev = _device(model)
    logits = [model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu() for ids in probe.prompts]
    nats, tokens = 0.0, 0
    for ids, mask in probe.rows:
        x = torch.tensor([ids], device=dev)
        out = model(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        keep = torch.tensor(mask[1:], device=dev, dtype=torch.bool)
        nll = torch.nn.functional.cross_entropy(out[keep], target[keep], reduction="sum")
        nats += nll.item()
        tokens += int(keep.sum())
    return {"logits": logits, "loss": nats / tokens if tokens else float("nan"), "tokens": tokens}


@dataclass
class Parity:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    reference_loss: float
    merged_loss: float
    loss_diff: float
    adapter_effect_mean_abs: float | None
    effect_ratio: float | None
    logit_atol: float
    loss_atol: float
    effect_rtol: float
    passed: bool
    positions: int
    eval_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        ratio = f", {100 * self.effect_ratio:.2f}% of the adapter's effect" if self.effect_ratio is not None else ""
        return (f"max |logit diff| {self.max_abs_logit_diff:.4g} (tolerance {self.logit_atol}), mean "
                f"{self.mean_abs_logit_diff:.3g}{ratio}; top-1 agreement {100 * self.top1_agreement:.1f}%; eval "
                f"loss {self.reference_loss:.5f} vs {self.merged_loss:.5f} (|diff| {abs(self.loss_diff):.2g}, "
                f"tolerance {self.loss_atol})")


def _diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float, int]:
    d = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).flatten() for x, y in zip(a, b)])
    return d.max().item(), d.mean().item(), agree.float().mean().item(), agree.numel()


def compare(reference: dict[str, Any], merged: dict[str, Any], base: dict[str, Any] | None = None,
            logit_atol: float = LOGIT_ATOL, loss_atol: float = LOSS_ATOL, effect_rtol: float = EFFECT_RTOL) -> Parity:
    """Merged vs reference (base + adapter); `base` (adapter off) scales the error by the adapter's effect."""
    max_d, mean_d, top1, n = _diffs(reference["logits"], merged["logits"])
    effect = ratio = None
    if base is not None:
        effect = _diffs(reference["logits"], base["logits"])[1]
        ratio = mean_d / effect if effect > 0 else None
    loss_d = merged["loss"] - reference["loss"]
    passed = (max_d <= logit_atol and math.isfinite(loss_d) and abs(loss_d) <= loss_atol
              and (ratio is None or ratio <= effect_rtol))
    return Parity(max_d, mean_d, top1, reference["loss"], merged["loss"], loss_d, effect, ratio, logit_atol,
                  loss_atol, effect_rtol, passed, n, reference["tokens"])
