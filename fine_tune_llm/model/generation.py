"""Generation: the config that stops at the end of the model's turn, and answering questions through the template.

The one owner of generation settings: training saves this config beside the adapter, releases rebuild it, and
evaluation and the notebooks generate with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..data.chat_template import render_prompt, turn_end, with_system
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


@torch.inference_mode()
def generate_answers(model, tokenizer, questions: Sequence[str | list[dict[str, str]]], max_new_tokens: int = 128,
                     do_sample: bool = False, seed: int = 0, batch_size: int = 8, system_prompt: str | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Answer each question through the chat template; stop at <eos> or the end of the model's turn.

    A question is a user's text, or a conversation ending with a user turn: the answer is to that last turn, given
    the earlier ones (whose result dict then carries them as `context`). Batches are padded on the left so every
    prompt ends where generation starts. `seconds` is the batch's wall time shared equally by its answers.
    Sampling reseeds first, so base and tuned draw the same random stream.
    """
    from transformers import set_seed

    gen = generation_config(tokenizer, getattr(model, "generation_config", None))
    gen.update(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if not do_sample:  # greedy: drop sampling knobs a base config may carry, so transformers does not warn
        gen.update(temperature=None, top_p=None, top_k=None)
    stop_ids = set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    conversations = [[{"role": "user", "content": q}] if isinstance(q, str) else list(q) for q in questions]
    prompts = [render_prompt(tokenizer, with_system(c, system_prompt)) for c in conversations]
    if do_sample:
        set_seed(seed)
    device, out = model_device(model), []
    for start in console.progress(range(0, len(prompts), batch_size), desc="generating", unit="batch",
                                  disable=not progress, leave=False):
        t0 = time.perf_counter()
        # The rendered prompt holds <bos> already.
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt").to(device)
        ids = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:].tolist()
        seconds = (time.perf_counter() - t0) / len(ids)
        for turns, new in zip(conversations[start:start + batch_size], ids):
            stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
            kept = new if stop is None else new[:stop]
            context = {"context": turns[:-1]} if len(turns) > 1 else {}
            out.append({"question": turns[-1]["content"], **context,
                        "answer": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        "new_tokens": len(kept) + (stop is not None), "hit_max_tokens": stop is None,
                        "stopped_on": None if stop is None else tokenizer.convert_ids_to_tokens(new[stop]),
                        "seconds": round(seconds, 4)})
    return out
