"""Log-likelihood of answers given their questions, and the numbers built on it.

Every number here starts from the same per-row pair (nats, tokens): the summed negative log-likelihood of the
trained tokens and how many there were, with the mask training uses (data/tokenized.encode_examples: every
assistant turn of a conversation, or the final one with train_on "last", each with the template's end-of-turn
token). From those:
- perplexity = exp(total nats / total tokens), token-weighted (a mean of per-batch means would weight a short
  answer in a small batch like a long one);
- bits per byte = total nats / ln 2 / UTF-8 bytes of the answers, which compares across tokenizers;
- preference: for (prompt, chosen, rejected) pairs, which final answer the model finds more likely given the
  earlier turns, per token (length-normalized) and in total (raw sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import console
from ..data.tokenized import encode_examples
from ..model.loading import model_device


@dataclass
class Scored:
    """Per-row results in input order. Rows whose prompt alone fills max_length are left out (`kept`)."""

    nats: list[float]
    tokens: list[int]
    bytes: list[int]
    kept: list[int]  # indices into the input lists
    status: list[str] = field(default_factory=list)  # per kept row: ok, cut or truncated (encode_conversations)

    def subset(self, rows: Sequence[int]) -> Scored:
        """The results of the input rows `rows` (indices into the original input), indexed as that list is."""
        at = {i: n for n, i in enumerate(self.kept)}
        new = [(p, at[i]) for p, i in enumerate(rows) if i in at]
        return Scored([self.nats[n] for _, n in new], [self.tokens[n] for _, n in new],
                      [self.bytes[n] for _, n in new], [p for p, _ in new], [self.status[n] for _, n in new])

    @property
    def total_nats(self) -> float:
        return math.fsum(self.nats)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)


def encode_answers(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int,
                   system_prompt: str | None = None) -> dict[str, list[Any]]:
    """One question and its answer per row: exactly the tokens and mask training uses for such a row. `bytes`: the
    UTF-8 bytes of the answer text scored (the end-of-turn token adds none: it is markup)."""
    examples = [{"row": n, "question": q, "answer": a} for n, (q, a) in enumerate(zip(questions, answers), start=1)]
    enc = encode_examples(tokenizer, examples, max_length, system_prompt)
    enc["bytes"] = enc["answer_bytes"]
    return enc


@torch.inference_mode()
def score_tokens(model, input_ids: Sequence[Sequence[int]], completion_mask: Sequence[Sequence[int]],
                 pad_id: int = 0, batch_size: int = 8, desc: str | None = None,
                 progress: bool = True) -> tuple[list[float], list[int]]:
    """Summed answer NLL (nats) and answer token count for each sequence, in input order.

    Batches are filled longest-first so little compute goes to padding. Padding is on the right with an
    attention mask, so a real token never sees a pad and keeps its position: with float32 logits, a sequence
    scores the same alone or in any batch.
    """
    n = len(input_ids)
    order = sorted(range(n), key=lambda i: -len(input_ids[i]))
    nats, tokens = [0.0] * n, [0] * n
    device, answer_only = model_device(model), takes_logits_to_keep(model)
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    for idx in console.progress(batches, desc=desc or "scoring", unit="batch", disable=not progress, leave=False):
        width = max(len(input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            length = len(input_ids[i])
            ids[row, :length] = torch.tensor(input_ids[i])
            attention[row, :length] = 1
            mask[row, :length] = torch.tensor(completion_mask[i], dtype=torch.bool)
        # Position t predicts token t+1: a masked target at t+1 is scored from the logits at t, and only those
        # positions are projected onto the vocabulary (logits_to_keep as a boolean mask: the same values, in the
        # same row-major order, without the prompt's logits). use_cache=False: a one-pass score needs no KV cache.
        target = mask[:, 1:]
        keep = torch.zeros_like(mask)
        keep[:, :-1] = target
        kwargs = {"logits_to_keep": keep.to(device)} if answer_only else {}
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False,
                       **kwargs).logits
        picked = (logits if answer_only else logits[keep.to(logits.device)]).float()
        labels = ids[:, 1:][target].to(picked.device)
        logp = torch.log_softmax(picked, dim=-1).gather(-1, labels[:, None]).squeeze(-1).double().cpu()
        counts = target.sum(dim=1).tolist()
        for i, chunk, count in zip(idx, torch.split(logp, counts), counts):
            nats[i] = -chunk.sum().item()
            tokens[i] = int(count)
    return nats, tokens


def score_sharing_prompts(model, input_ids: Sequence[Sequence[int]], completion_mask: Sequence[Sequence[int]],
                          pad_id: int = 0, batch_size: int = 8, desc: str | None = None,
                          progress: bool = True) -> tuple[list[float], list[int]]:
    """score_tokens' (nats, tokens), the prompt run once for two sequences that share it: such a pair is one row,
    prompt + answer + other answer, the other answer attending to the prompt and to itself only, its positions
    restarting after the prompt (train/preference_logps.packed_pair_logps, the reference pass's own packing). The
    prompt is more than half the tokens of a psychology pair, so a pair costs about a third less. Sequences
    without a partner, or whose trained tokens are not all of what follows the prompt, and models whose attention
    takes no custom mask (flash-attention), are scored as score_tokens scores them (`batch_size` a batch)."""
    from ..train.preference_logps import packed_pair_logps, shares_prompts

    if takes_logits_to_keep(model) and shares_prompts(model):
        pairs, rest = _shared_prompt_pairs(input_ids, completion_mask)
    else:
        pairs, rest = [], list(range(len(input_ids)))
    nats, tokens = [0.0] * len(input_ids), [0] * len(input_ids)
    if pairs:  # packed_pair_logps runs under inference_mode itself
        answer = [[input_ids[i][p:] for i, _, p in pairs], [input_ids[j][p:] for _, j, p in pairs]]
        logps = packed_pair_logps(model, [input_ids[i][:p] for i, _, p in pairs], *answer, pad_id,
                                  desc=f"{desc or 'scoring'} (pairs)", progress=progress)
        for n, (i, j, _) in enumerate(pairs):
            nats[i], tokens[i] = -logps["chosen"][n], len(answer[0][n])
            nats[j], tokens[j] = -logps["rejected"][n], len(answer[1][n])
    if rest:
        apart = score_tokens(model, [input_ids[i] for i in rest], [completion_mask[i] for i in rest], pad_id,
                             batch_size, desc, progress)
        for i, n, t in zip(rest, *apart):
            nats[i], tokens[i] = n, t
    return nats, tokens


def _shared_prompt_pairs(input_ids, completion_mask) -> tuple[list[tuple[int, int, int]], list[int]]:
    """([(i, j, prompt length)], the other indices): sequences paired two by two when their prompts (the tokens
    before the first trained one) are the same and everything after the prompt is trained."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (ids, mask) in enumerate(zip(input_ids, completion_mask)):
        p = next((t for t, m in enumerate(mask) if m), len(mask))
        if 0 < p < len(ids) and all(mask[p:]):
            by_prompt.setdefault(tuple(ids[:p]), []).append(i)
        else:
            rest.append(i)
    pairs = []
    for prompt, members in by_prompt.items():
        pairs += [(i, j, len(prompt)) for i, j in zip(members[::2], members[1::2])]
        rest += members[-1:] if len(members) % 2 else []
    return pairs, rest


def takes_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward selects the positions it projects (transformers' causal LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def score_answers(model, tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int,
                  system_prompt: str | None = None, batch_size: int = 8, desc: str | None = None,
                  progress: bool = True) -> Scored:
    """Encode (question, answer) pairs the way training does and score every answer that fits."""
    enc = encode_answers(tokenizer, questions, answers, max_length, system_prompt)
    return score_encoded(model, tokenizer, enc, batch_size, desc, progress)


def score_examples(model, tokenizer, examples: Sequence[dict[str, Any]], max_length: int,
                   system_prompt: str | None = None, train_on: str = "all", batch_size: int = 8,
                   desc: str | None = None, progress: bool = True) -> Scored:
    """Encode examples (any format, multi-turn included) the way training does and score their trained tokens."""
    enc = encode_examples(tokenizer, list(examples), max_length, system_prompt, train_on)
    return score_encoded(model, tokenizer, enc, batch_size, desc, progress)


def score_encoded(model, tokenizer, enc: dict[str, list[Any]], batch_size: int = 8, desc: str | None = None,
                  progress: bool = True) -> Scored:
    return score_parts(model, tokenizer, {"": enc}, batch_size, desc, progress)[""]


def score_parts(model, tokenizer, parts: dict[str, dict[str, list[Any]]], batch_size: int = 8,
                desc: str | None = None, progress: bool = True) -> dict[str, Scored]:
    """Several encodings (encode_examples' output, by name) scored in one length-sorted stream of batches: one pass
    over the model however many sets a column needs, two sequences with the same prompt (a pair's chosen and
    rejected answer) in one row (score_sharing_prompts). A sequence scores the same in any batch and row, up to
    float32 rounding, so this equals scoring each set on its own."""
    kept = {name: [i for i, s in enumerate(enc["status"]) if s != "too_long"] for name, enc in parts.items()}
    ids = [parts[name]["input_ids"][i] for name in parts for i in kept[name]]
    masks = [parts[name]["completion_mask"][i] for name in parts for i in kept[name]]
    nats, tokens = score_sharing_prompts(model, ids, masks, pad_id=_pad_id(tokenizer), batch_size=batch_size,
                                         desc=desc, progress=progress)
    out, start = {}, 0
    for name, enc in parts.items():
        rows, stop = kept[name], start + len(kept[name])
        out[name] = Scored(nats[start:stop], tokens[start:stop], [enc["answer_bytes"][i] for i in rows], rows,
                           [enc["status"][i] for i in rows])
        start = stop
    return out


def _pad_id(tokenizer) -> int:
    # Any id works (pads are masked out of attention and of the loss); 0 when the tokenizer has none.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def perplexity(total_nats: float, total_tokens: int) -> float:
    """exp of the token-weighted mean NLL."""
    return math.exp(total_nats / total_tokens) if total_tokens else float("nan")


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / math.log(2) / total_bytes if total_bytes else float("nan")


def language_metrics(scored: Scored) -> dict[str, Any]:
    return {
        "answers": len(scored.kept),
        "answer_tokens": scored.total_tokens,
        "answer_bytes": scored.total_bytes,
        "nats": scored.total_nats,
        "loss": scored.total_nats / scored.total_tokens if scored.total_tokens else float("nan"),
        "perplexity": perplexity(scored.total_nats, scored.total_tokens),
        "bits_per_byte": bits_per_byte(scored.total_nats, scored.total_bytes),
    }


def preference_metrics(chosen: tuple[Sequence[float], Sequence[int]], rejected: tuple[Sequence[float], Sequence[int]],
                       n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How often, and by how much, the model prefers the chosen answer of each pair.

    chosen/rejected: (nats, tokens) per pair, aligned. Log-likelihood is -nats; the normalized score is the
    mean log-prob per answer token. Ties count as half right. The margin (normalized chosen minus rejected,
    in nats per token) keeps moving after accuracy saturates; its 95% CI is a percentile bootstrap over pairs.
    """
    nats_j, tok_j = np.asarray(chosen[0], dtype=float), np.asarray(chosen[1], dtype=float)
    nats_k, tok_k = np.asarray(rejected[0], dtype=float), np.asarray(rejected[1], dtype=float)
    n = len(nats_j)
    if n == 0:
        return {"pairs": 0}
    norm_margin = (-nats_j / tok_j) - (-nats_k / tok_k)
    sum_margin = (-nats_j) - (-nats_k)
    lo, hi = bootstrap_ci(norm_margin, n_boot=n_boot, seed=seed)
    return {
        "pairs": n,
        "accuracy_normalized": _accuracy(norm_margin),
        "accuracy_sum": _accuracy(sum_margin),
        "mean_margin": float(norm_margin.mean()),
        "margin_ci95": [lo, hi],
        "mean_margin_sum": float(sum_margin.mean()),
        # The raw sum favours the shorter answer: this says how often the chosen one is the longer.
        "chosen_longer": float((tok_j > tok_k).mean()),
    }


def _accuracy(margins: np.ndarray) -> float:
    return float(((margins > 0) + 0.5 * (margins == 0)).mean())


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks keep memory flat for large splits
        stop = min(start + 256, n_boot)
        means[start:stop] = values[rng.integers(0, len(values), size=(stop - start, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
