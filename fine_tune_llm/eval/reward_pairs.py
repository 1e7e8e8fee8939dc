"""The token sequences a reward judge reads: the run's chat template, one end-of-turn, and the length control.

Every answer, whether a training pair's or a generated one, is read as `prompt + answer[:n] + end-of-turn`: the
prompt exactly as training renders it (data/tokenized.encode_examples: the template, the system prompt, control
strings stripped), the answer's own tokens cut to n, then the template's end-of-turn token(s). The end-of-turn is
written after every answer, cut or whole, so the judge always reads its score at the same kind of token (the one a
finished turn ends on) and the presence of an end cannot tell a cut answer from a whole one.

The length control cuts the two answers of a pair to the same n: the judge never sees which was longer. Cut to the
shorter one's length (`matched`), the shorter answer still ends where its author ended it and the longer one
mid-sentence: a judge trained that way learns "the answer that ends cleanly is the shorter one", a length cue in
disguise (measured: docs/results.md#reward-model-judge). So training cuts both strictly inside (`inside`: n drawn
between half the shorter one's length and one token less than it), and the held-out check `half` cuts both to half
the shorter one's length, where neither ending can help.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.chat_template import turn_end
from ..data.tokenized import encode_examples
from ..errors import ConfigError

# Prompts are not cut here: whatever the run trained or generated on is read whole (answers are capped instead).
NO_LIMIT = 1 << 30
CUTS = ("whole", "matched", "half")  # the held-out checks; training uses "inside"


@dataclass(frozen=True)
class Answer:
    """One answer as the judge reads it: the tokens before it and its own tokens (no end-of-turn)."""

    prompt: list[int]
    tokens: list[int]


def end_ids(tokenizer) -> list[int]:
    """The template's end-of-turn as token ids (Gemma: <end_of_turn>; ChatML: <|im_end|>)."""
    return tokenizer(turn_end(tokenizer), add_special_tokens=False)["input_ids"]


def judge_pad_id(tokenizer) -> int:
    """A padding id that is not the end-of-turn: a sequence classifier reads its score at the last token that is not
    padding, so padding with the end-of-turn (SmolLM2's pad token is <|im_end|>) would move the read one token back,
    onto the answer's last word. The tokenizer's pad, else its unk, else its bos, whichever is not an end id."""
    end = set(end_ids(tokenizer))
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id):
        if candidate is not None and candidate not in end:
            return candidate
    raise ConfigError(f"{tokenizer.name_or_path}: no padding token distinct from the end-of-turn "
                      f"{turn_end(tokenizer)!r}: a reward judge cannot tell where an answer ends")


def example_of(prompt: str | list[dict[str, str]], answer: str, row: Any = None) -> dict[str, Any]:
    """A question (str) or a conversation ending with a user turn, answered by `answer`, as a data example."""
    if isinstance(prompt, str):
        return {"row": row, "question": prompt, "answer": answer}
    last_user = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return {"row": row, "question": last_user, "answer": answer,
            "messages": [*prompt, {"role": "assistant", "content": answer}]}


def encode_answers(tokenizer, examples: Sequence[dict[str, Any]], system_prompt: str | None,
                   end: list[int]) -> list[Answer]:
    """Each example's final answer split from its prompt, with the template and masks training uses."""
    enc = encode_examples(tokenizer, list(examples), NO_LIMIT, system_prompt, train_on="last")
    out = []
    for ids, mask in zip(enc["input_ids"], enc["completion_mask"]):
        start = mask.index(1)
        answer = ids[start:]
        if end and answer[-len(end):] == end:
            answer = answer[:-len(end)]
        out.append(Answer(ids[:start], answer))
    return out


def cut_length(a: Answer, b: Answer, cut: str, cap: int, rng: random.Random | None = None) -> int:
    """The answer length both answers of a pair are read at: `matched` the shorter one's, `half` half of it (at
    least one token), `inside` drawn from [half, shorter - 1] with `rng`; capped at `cap`. `whole` is not a pair cut
    (each answer is read at its own length)."""
    n = min(len(a.tokens), len(b.tokens), cap)
    if cut == "matched":
        return n
    if cut == "half":
        return max(1, n // 2)
    if cut == "inside":
        return (rng or random.Random(0)).randint(max(1, (n + 1) // 2), n - 1) if n > 1 else n
    raise ValueError(f"cut must be 'matched', 'half' or 'inside', got {cut!r}")


def sequence(a: Answer, n: int, end: list[int]) -> list[int]:
    """prompt + the answer's first n tokens + the end-of-turn."""
    return a.prompt + a.tokens[:n] + end


def whole(a: Answer, cap: int, end: list[int]) -> list[int]:
    return sequence(a, cap, end)


def pair_sequences(first: Sequence[Answer], second: Sequence[Answer], cut: str, cap: int,
                   end: list[int], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Both sides of each pair as the judge reads them: each whole (capped), or both cut to one length."""
    if cut == "whole":
        return [whole(a, cap, end) for a in first], [whole(b, cap, end) for b in second]
    rng = random.Random(seed)
    lengths = [cut_length(a, b, cut, cap, rng) for a, b in zip(first, second)]
    return ([sequence(a, n, end) for a, n in zip(first, lengths)],
            [sequence(b, n, end) for b, n in zip(second, lengths)])
