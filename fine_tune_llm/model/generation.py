"""Generation: the config that stops at the end of the model's turn, and answering questions through the template.

The one owner of generation settings: training saves this config beside the adapter, releases rebuild it, and
evaluation and the notebooks generate with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..data.chat_template import render_prompt, turn_end, with_system
from .decoding import RowSampler, adapter_args, decode, generate_only, kv_bytes_per_token
from .loading import model_device

# Questions notebook 01 asks any model: everyday worries of the kind the psychology data holds.
EXAMPLE_QUESTIONS = [
    "I feel anxious before every exam, even when I have studied. What can I do?",
    "My partner and I argue about small things all the time. How can we stop?",
    "I have been feeling lonely since I moved to a new city.",
    "How do I tell my parents that I want to see a therapist?",
]


def generation_config(tokenizer, base=None):
    """Stop on <eos> and on the template's end-of-turn token (gemma-2b-it's own config lists only <eos>)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(**(base.to_diff_dict() if base is not None else {}))
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(turn_end(tokenizer))]
    gen.eos_token_id = sorted({i for i in ids if i is not None})
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return gen


def save_inference_files(tokenizer, model, out: Path) -> None:
    """Tokenizer with its chat template, and a generation config that stops at the end of the turn."""
    tokenizer.save_pretrained(str(out))
    generation_config(tokenizer, getattr(model, "generation_config", None)).save_pretrained(str(out))


# Rows of one batch when several columns answer together (generate_columns): a decoding step pays for reading the
# weights once for all its rows, and ended rows leave the batch, so all of a default evaluation's answers fit one
# batch; what grows with the rows is the KV cache, rows x (prompt + answer) tokens (measured: docs/results.md#evaluation-speed).
GENERATION_ROWS = 192
# ...and at most this much KV cache: long prompts (multi-turn conversations) make a batch of fewer rows.
GENERATION_CACHE_BYTES = 2 * 1024**3
BASE = "__base__"  # peft's name for "every adapter off" in a mixed-adapter batch


@torch.inference_mode()
def generate_answers(model, tokenizer, questions: Sequence[str | list[dict[str, str]]], max_new_tokens: int = 128,
                     do_sample: bool = False, seed: int = 0, batch_size: int = 8, system_prompt: str | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Answer each question through the chat template; stop at <eos> or the end of the model's turn.

    A question is a user's text, or a conversation ending with a user turn: the answer is to that last turn, given
    the earlier ones (whose result dict then carries them as `context`). Batches are padded on the left so every
    prompt ends where generation starts. `seconds` is the batch's wall time shared equally by its answers.
    Sampling reseeds first, so two models answering the same questions draw the same random stream.
    """
    from transformers import set_seed

    gen, _ = _generation_settings(model, tokenizer, max_new_tokens, do_sample)
    conversations, prompts = _prompts(tokenizer, questions, system_prompt)
    if do_sample:
        set_seed(seed)
    out = []
    for start in console.progress(range(0, len(prompts), batch_size), desc="generating", unit="batch",
                                  disable=not progress, leave=False):
        t0 = time.perf_counter()
        enc = _left_padded(tokenizer, prompts[start:start + batch_size], model_device(model))
        ids = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:].tolist()
        seconds = (time.perf_counter() - t0) / len(ids)
        out += [_answer(tokenizer, turns, new, gen, seconds) for turns, new in zip(conversations[start:], ids)]
    return out


@dataclass(frozen=True)
class Ask:
    """One row of a mixed batch: question `question` (an index) answered by `adapter` (BASE: adapters off)."""

    question: int
    adapter: str
    sample: bool


@torch.inference_mode()
def generate_columns(model, tokenizer, questions: Sequence[str | list[dict[str, str]]], adapters: Sequence[str],
                     max_new_tokens: int = 128, seed: int = 0, rows: int = GENERATION_ROWS,
                     system_prompt: str | None = None, modes: Sequence[str] = ("greedy", "sampled"),
                     progress: bool = True) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every adapter's greedy and sampled answers to the same questions, `rows` answers a batch (fewer where their
    KV cache would pass GENERATION_CACHE_BYTES): {mode: {adapter: [answer per question]}}, answers as
    generate_answers makes them.

    One base model, adapters mixed in a batch (peft's adapter_names; BASE runs with every adapter off), padded on
    the left: a greedy answer is the one generate_answers gives with that adapter alone. A sampled answer draws
    from its own generator, seeded by (seed, question): it depends on the model, the question and the seed only,
    never on the batch it shares, and every adapter answering a question draws the same random stream.
    A batch is decoded by decoding.decode (each prompt prefilled once per adapter, ended rows dropped), or by
    model.generate where the config asks what only generate does (decoding.generate_only). Rows are ordered
    adapter by adapter. A model without adapters (no peft) answers as BASE.
    """
    gen, warpers = _generation_settings(model, tokenizer, max_new_tokens, do_sample=False)
    answer_rows = _generated if generate_only(gen) else decode
    conversations, prompts = _prompts(tokenizer, questions, system_prompt)
    asks = [Ask(q, a, mode == "sampled") for a in adapters for mode in modes for q in range(len(questions))]
    widths = [len(ids) + max_new_tokens for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    answers: dict[Ask, dict[str, Any]] = {}
    for batch in console.progress(cache_bounded_batches(asks, widths, rows, kv_bytes_per_token(model)),
                                  desc="generating", unit="batch", disable=not progress, leave=False):
        t0 = time.perf_counter()
        enc = _left_padded(tokenizer, [prompts[a.question] for a in batch], model_device(model))
        names = [a.adapter for a in batch] if hasattr(model, "peft_config") else None
        sampler = RowSampler(warpers, [_row_seed(seed, prompts[a.question]) if a.sample else None for a in batch],
                             enc["input_ids"].device)
        ids = answer_rows(model, enc, names, sampler, gen)
        seconds = (time.perf_counter() - t0) / len(ids)
        for ask, new in zip(batch, ids):
            answers[ask] = _answer(tokenizer, conversations[ask.question], new, gen, seconds)
    return {mode: {a: [answers[Ask(q, a, mode == "sampled")] for q in range(len(questions))] for a in adapters}
            for mode in modes}


def cache_bounded_batches(asks: list[Ask], widths: list[int], rows: int, bytes_per_token: int) -> list[list[Ask]]:
    """`asks` in order, cut into batches of at most `rows` whose KV cache, rows x the widest of their prompts plus
    the answer (`widths`, by question), stays within GENERATION_CACHE_BYTES (a single ask may pass it)."""
    batches: list[list[Ask]] = []
    batch: list[Ask] = []
    width = 0
    for ask in asks:
        wider = max(width, widths[ask.question])
        if batch and (len(batch) == rows or (len(batch) + 1) * wider * bytes_per_token > GENERATION_CACHE_BYTES):
            batches.append(batch)
            batch, wider = [], widths[ask.question]
        batch.append(ask)
        width = wider
    return batches + ([batch] if batch else [])


def _generated(model, enc, adapters: list[str] | None, sampler: RowSampler, gen) -> list[list[int]]:
    """Each row's new tokens from model.generate (padded after the stop token), the sampler as its logits
    processor: decode's arguments, for a config asking what only generate does (decoding.generate_only)."""
    from transformers import LogitsProcessorList

    out = model.generate(**enc, generation_config=gen, logits_processor=LogitsProcessorList([sampler]),
                         **adapter_args(adapters))
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _row_seed(seed: int, prompt: str) -> int:
    """A seed per (seed, question): the question's rendered prompt hashed, so an answer's random stream does not
    depend on where its question stands in the list, nor on the questions beside it."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()[:8], "little") >> 1


def _generation_settings(model, tokenizer, max_new_tokens: int, do_sample: bool):
    """The generation config (stops at the end of the turn) and the warpers sampling applies, in generate's order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = generation_config(tokenizer, getattr(model, "generation_config", None))
    warpers = []
    if gen.temperature is not None and gen.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p is not None and gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))
    gen.update(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if not do_sample:  # greedy: drop sampling knobs a base config may carry, so transformers does not warn
        gen.update(temperature=None, top_p=None, top_k=None)
    return gen, warpers


def _prompts(tokenizer, questions, system_prompt):
    conversations = [[{"role": "user", "content": q}] if isinstance(q, str) else list(q) for q in questions]
    return conversations, [render_prompt(tokenizer, with_system(c, system_prompt)) for c in conversations]


def _left_padded(tokenizer, prompts: list[str], device):
    # The rendered prompt holds <bos> already.
    return tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",
                     return_tensors="pt").to(device)


def _answer(tokenizer, turns: list[dict[str, str]], new: list[int], gen, seconds: float) -> dict[str, Any]:
    stop_ids = set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
    kept = new if stop is None else new[:stop]
    context = {"context": turns[:-1]} if len(turns) > 1 else {}
    return {"question": turns[-1]["content"], **context,
            "answer": tokenizer.decode(kept, skip_special_tokens=True).strip(),
            "new_tokens": len(kept) + (stop is not None), "hit_max_tokens": stop is None,
            "stopped_on": None if stop is None else tokenizer.convert_ids_to_tokens(new[stop]),
            "seconds": round(seconds, 4)}
