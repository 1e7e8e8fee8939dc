"""Answer-only log-probs for the preference stage, and its reference pass, computed once and kept in the run.

Why: TRL's DPOTrainer (1.16) patches the model with a fused LM head that, off CUDA/XPU, projects *every* position
of the [chosen; rejected] batch onto the vocabulary, prompt and padding included, and scores them in float32 tiles
(trl/trainer/utils.py `add_fused_lm_head`, `compact = _use_triton(...)`). Only answer tokens carry a log-prob. Here
that head is replaced by the SFT stage's answer-only one (train/answer_loss.py): the model is asked for logits at
answer positions only (`logits_to_keep` as a boolean mask) and a chunked cross-entropy gives their log-probs, with
the entropy, mean logit and top-1 TRL logs, from the same chunks. TRL's loss code is untouched: it reads the same
per-token `log_probs` (zero off the answers), so every loss type works as before.

The reference policy (the SFT adapter before the first step) is scored by a forward-only pass of its own, no
gradients: each pair is one row, prompt + chosen + rejected, the prompt run once for both answers (the rejected
answer is masked from the chosen one and its positions restart after the prompt), rows sorted by length into
batches of a token budget. Its result is
written to the run (RunDir.reference_logps_file) with a fingerprint of what it depends on, so a resumed stage reads
it back instead of recomputing it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import types
from collections.abc import Sequence
from typing import Any

import torch

from .. import console
from ..files import read_json, write_json
from ..run import RunDir
from .answer_loss import ChunkedCrossEntropy, answer_positions

log = logging.getLogger(__name__)

# Tokens per reference batch. Not the largest that fits: the answer positions' logits (answer tokens x vocabulary)
# are materialized per batch, and past a few thousand tokens that memory traffic made batches slower per token on
# a CPU (docs/results.md#preference-stage-speed).
REF_BATCH_TOKENS = 2048
CACHE_FORMAT = 1


def install_answer_only_head(base_model) -> None:
    """Make `base_model(..., labels=..., fused_lm_head=True)` (TRL's call) compute log-probs at answer positions only.

    `base_model` is the transformers model TRL patched (the PEFT wrapper's base model); calls without
    fused_lm_head (generation) go to TRL's forward unchanged."""
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = base_model.forward
    model_forward = type(base_model).forward

    @functools.wraps(model_forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        keep, targets = answer_positions(labels)
        kwargs["use_cache"] = False
        logits = model_forward(self, *args, logits_to_keep=keep, **kwargs).logits
        nll, top1, entropy, mean_logit = ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets,
                                                                   True)
        mask = labels[:, 1:] != -100

        def per_token(x: torch.Tensor) -> torch.Tensor:  # zero where the label is -100, as TRL's head returns
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=nll.sum() / denom, log_probs=per_token(-nll), entropy=per_token(entropy),
                                   mean_logits=per_token(mean_logit), is_top1=per_token(top1), label_mask=mask)

    base_model.forward = types.MethodType(forward, base_model)


@torch.inference_mode()
def sequence_logps(model, sequences: Sequence[Sequence[int]], answer_starts: Sequence[int], pad_id: int,
                   batch_tokens: int = REF_BATCH_TOKENS, desc: str = "reference log-probs",
                   progress: bool = True, pad_to: int | None = None) -> list[float]:
    """Summed log-prob of each sequence's tokens from `answer_starts[i]` on, in input order. Sequences are sorted by
    length and packed into batches of at most `batch_tokens` (padded) tokens; padding is on the right, each batch's
    width rounded up to a multiple of `pad_to` (length_batches)."""
    from ..model.loading import model_device

    widths = [_round_up(len(s), pad_to) for s in sequences]
    device, out = model_device(model), [0.0] * len(sequences)
    for idx in console.progress(length_batches(widths, batch_tokens), desc=desc, unit="batch", disable=not progress,
                                leave=False):
        width = widths[idx[0]]
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = torch.tensor(sequences[i])
            ids[row, :len(seq)], attention[row, :len(seq)] = seq, 1
            labels[row, answer_starts[i]:len(seq)] = seq[answer_starts[i]:]
        keep, targets = answer_positions(labels)
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False,
                       logits_to_keep=keep.to(device)).logits
        nll = ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.to(device))[0]
        for i, chunk in zip(idx, torch.split(nll.double().cpu(), keep.sum(dim=1).tolist())):
            out[i] = -chunk.sum().item()
    return out


def pair_logps(model, pairs, pad_id: int, desc: str, progress: bool = True,
               pad_to: int | None = None) -> dict[str, list[float]]:
    """{"chosen": [...], "rejected": [...]}: each pair's summed answer log-probs. Where the attention takes a
    custom mask, a pair is one row whose prompt both answers share (packed_pair_logps); else each answer is a
    sequence of its own, all sorted together by length (sequence_logps)."""
    prompts, chosen, rejected = list(pairs["prompt_ids"]), list(pairs["chosen_ids"]), list(pairs["rejected_ids"])
    if shares_prompts(model):
        return packed_pair_logps(model, prompts, chosen, rejected, pad_id, desc=desc, progress=progress, pad_to=pad_to)
    n = len(prompts)
    sequences = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    logps = sequence_logps(model, sequences, [len(p) for p in prompts] * 2, pad_id, desc=desc, progress=progress,
                           pad_to=pad_to)
    return {"chosen": logps[:n], "rejected": logps[n:]}


def shares_prompts(model) -> bool:
    """Eager and SDPA attention take a 4D mask as given (transformers' masking_utils); flash-attention does not."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("eager", "sdpa")


def packed_rows(prompt: list[int], chosen: list[int], rejected: list[int]):
    """One row holding prompt + chosen + rejected: (ids, position ids, the rejected answer's first index). The
    rejected answer continues from the prompt: its positions restart where the chosen answer's began."""
    start = len(prompt) + len(chosen)
    ids = prompt + chosen + rejected
    positions = list(range(start)) + list(range(len(prompt), len(prompt) + len(rejected)))
    return ids, positions, start


@torch.inference_mode()
def packed_pair_logps(model, prompts, chosen, rejected, pad_id: int, batch_tokens: int = REF_BATCH_TOKENS,
                      desc: str = "reference log-probs", progress: bool = True,
                      pad_to: int | None = None) -> dict[str, list[float]]:
    """Summed log-probs of both answers of each pair, the prompt run once: a row is prompt + chosen + rejected, and
    the rejected answer's tokens attend to the prompt and to themselves, never to the chosen answer. Its first
    token is scored from the prompt's last position, the one that also scores the chosen answer's first token."""
    from ..model.loading import model_device

    n = len(prompts)
    width = [_round_up(len(p) + len(c) + len(r), pad_to) for p, c, r in zip(prompts, chosen, rejected)]
    device, out = model_device(model), {"chosen": [0.0] * n, "rejected": [0.0] * n}
    for idx in console.progress(length_batches(width, batch_tokens), desc=desc, unit="batch", disable=not progress,
                                leave=False):
        ids, positions, allowed, keep, targets, first_rejected = _packed_batch(idx, prompts, chosen, rejected, pad_id,
                                                                               width[idx[0]])
        # SDPA takes the boolean mask; eager attention adds it to its scores
        mask = allowed if model.config._attn_implementation == "sdpa" else torch.zeros(
            allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        logits = model(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask.to(device),
                       use_cache=False, logits_to_keep=keep.to(device)).logits
        logits = logits.reshape(-1, logits.shape[-1])
        # The prompt's last position is each row's first kept one: it scores the rejected answer's first token too
        # (a few rows picked apart: concatenating them to all the logits would copy every kept logit).
        row_starts = torch.cumsum(keep.sum(dim=1), 0) - keep.sum(dim=1)
        nll = ChunkedCrossEntropy.apply(logits, targets.to(device))[0].double().cpu()
        first = ChunkedCrossEntropy.apply(logits[row_starts.to(logits.device)], first_rejected.to(device))[0]
        counts = keep.sum(dim=1).tolist()
        for b, (i, chunk) in enumerate(zip(idx, torch.split(nll, counts))):
            n_chosen = len(chosen[i])
            out["chosen"][i] = -chunk[:n_chosen].sum().item()
            out["rejected"][i] = -(chunk[n_chosen:].sum() + first[b].double()).item()
    return out


def length_batches(width: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted longest first, cut into batches of at most `batch_tokens` (rows x the first row's width)."""
    batches, batch = [], []
    for i in sorted(range(len(width)), key=lambda i: -width[i]):
        if batch and (len(batch) + 1) * width[batch[0]] > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + ([batch] if batch else [])


def _round_up(n: int, multiple: int | None) -> int:
    # Batch widths from a bounded set: oneDNN compiles and keeps a kernel per matmul shape (its primitive cache),
    # so a new width every batch grows the process by ~0.3 GB over a reference pass (docs/results.md#where-the-
    # memory-goes); training pads to the same multiple for the same reason.
    return -(-n // multiple) * multiple if multiple else n


def _packed_batch(idx, prompts, chosen, rejected, pad_id: int, width: int | None = None):
    """Tensors of one batch of packed rows: ids, position ids, the 4D attention mask (True: may attend), the positions whose
    logits are kept (in order: the chosen answer's predictions, then the rejected one's after its first token),
    their targets, and each row's rejected first token."""
    rows = [packed_rows(prompts[i], chosen[i], rejected[i]) for i in idx]
    width = max([len(r[0]) for r in rows] + [width or 0])
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(idx), width), dtype=torch.long)
    allowed = torch.zeros((len(idx), width, width), dtype=torch.bool)
    keep = torch.zeros((len(idx), width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    targets, first_rejected = [], []
    for b, (i, (row, pos, start)) in enumerate(zip(idx, rows)):
        length, p = len(row), len(prompts[i])
        ids[b, :length], positions[b, :length] = torch.tensor(row), torch.tensor(pos)
        allowed[b, :length, :length] = causal[:length, :length]
        allowed[b, start:length, p:start] = False  # the rejected answer never sees the chosen one
        keep[b, p - 1:start - 1] = True  # predicts chosen[0:]
        keep[b, start:length - 1] = True  # predicts rejected[1:]
        targets += chosen[i] + rejected[i][1:]
        first_rejected.append(rejected[i][0])
    allowed |= ~allowed.any(dim=-1, keepdim=True)  # padding rows attend to something (their output is unused)
    return ids, positions, allowed[:, None], keep, torch.tensor(targets), torch.tensor(first_rejected)


def fingerprint(pairs_by_split: dict[str, Any], reference: dict[str, Any]) -> str:
    """What the reference log-probs depend on: the token ids of every pair, and the reference policy (the SFT
    adapter's hash, the base model, the compute dtype)."""
    h = hashlib.sha256(json.dumps(reference, sort_keys=True, default=str).encode())
    for name in sorted(pairs_by_split):
        pairs = pairs_by_split[name]
        h.update(name.encode())
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(json.dumps(list(pairs[column])).encode())
    return h.hexdigest()


def cached_reference(run: RunDir, pairs_by_split: dict[str, Any], reference: dict[str, Any], compute,
                     ) -> tuple[dict[str, dict[str, list[float]]], bool]:
    """(log-probs per split, whether they were read back). `compute(name, pairs)` scores one split; the result is
    written to the run (atomically) before training starts."""
    key = fingerprint(pairs_by_split, reference)
    saved = read_json(run.reference_logps_file)
    if saved and saved.get("format") == CACHE_FORMAT and saved.get("fingerprint") == key:
        return saved["splits"], True
    if saved:
        log.info("%s was computed for other pairs or another reference: computing it again",
                 run.reference_logps_file.name)
    t0 = time.perf_counter()
    splits = {name: compute(name, pairs) for name, pairs in pairs_by_split.items() if len(pairs)}
    write_json(run.reference_logps_file, {"format": CACHE_FORMAT, "fingerprint": key, "reference": reference,
                                          "seconds": round(time.perf_counter() - t0, 2), "splits": splits})
    return splits, False


def with_reference_columns(pairs, logps: dict[str, list[float]]):
    return pairs.add_column("ref_chosen_logps", logps["chosen"]).add_column("ref_rejected_logps", logps["rejected"])


__all__ = ["cached_reference", "install_answer_only_head", "pair_logps", "sequence_logps", "with_reference_columns"]
