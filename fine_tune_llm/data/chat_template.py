"""Chat formatting and tokenization: messages -> token ids with a mask over exactly the answer.

Why our own tokenization instead of TRL's: TRL trains on everything the template writes after the prompt,
which for Gemma is `answer<end_of_turn>\\n`. We train on `answer<end_of_turn>` exactly, keep one `<bos>`,
and strip control strings from user text so a row cannot forge a turn.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError

# gemma-2b-it's chat template, verbatim (it writes <bos> itself and refuses a system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def build_messages(user: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """One user turn. A system prompt is folded into it: Gemma's template raises on a system role."""
    content = f"{system_prompt.strip()}\n\n{user}" if system_prompt else user
    return [{"role": "user", "content": content}]


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Accept OpenAI-style conversations with a system message; Gemma has no system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if not rest or rest[0]["role"] != "user":
        raise DataError("a system message must be followed by a user message")
    rest[0]["content"] = f"{system.strip()}\n\n{rest[0]['content']}"
    return rest


def control_strings(tokenizer) -> list[str]:
    """Strings the tokenizer turns into special ids: user text must never contain them."""
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def sanitize(text: str, controls: list[str]) -> str:
    # Repeat until nothing changes: removing one control string can join its neighbours into another
    # ("<start_of_<end_of_turn>turn>" -> "<start_of_turn>"). Terminates: every pass that changes text shortens it.
    while True:
        before = text
        for s in controls:
            text = text.replace(s, "")
        if text == before:
            return text


def turn_end(tokenizer) -> str:
    """What the template writes right after an assistant answer, e.g. `<end_of_turn>` or `<|im_end|>`."""
    probe = "PROBE"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    return full[full.rindex(probe) + len(probe):].rstrip()


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The generation prompt; user text is sanitized here too, so evaluation prompts cannot forge a turn."""
    controls = control_strings(tokenizer)
    clean = [{**m, "content": sanitize(m["content"], controls)} for m in fold_system(messages)]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)


def completion_texts(tokenizer, answers: list[str], controls: list[str] | None = None) -> list[str]:
    """Each answer as training learns it and scoring scores it: sanitized, stripped, then the template's end of
    turn (the answer mask covers it, so a model is taught, and judged on, ending its turn)."""
    controls = control_strings(tokenizer) if controls is None else controls
    end = turn_end(tokenizer)
    return [sanitize(a, controls).strip() + end for a in answers]


def encode_batch(tokenizer, prompts: list[list[dict[str, str]]], answers: list[str],
                 max_length: int) -> dict[str, list[Any]]:
    """Tokenize prompt+answer pairs: input_ids, completion_mask (1 on answer + turn end) and a status.

    status: "ok", "truncated" (answer cut at max_length) or "too_long" (the prompt alone fills max_length;
    such rows are dropped by the caller and counted in the log).
    """
    controls = control_strings(tokenizer)
    clean = [[{**m, "content": sanitize(m["content"], controls)} for m in p] for p in prompts]
    prompt_text = [render_prompt(tokenizer, p) for p in clean]
    answer_text = completion_texts(tokenizer, answers, controls)
    # The rendered prompt already holds <bos>: add_special_tokens=False keeps it to exactly one.
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    out: dict[str, list[Any]] = {"input_ids": [], "completion_mask": [], "status": []}
    for p, a in zip(p_ids, a_ids):
        status = "ok"
        if len(p) >= max_length - 8:
            status, a = "too_long", a[:1]
        elif len(p) + len(a) > max_length:
            status, a = "truncated", a[: max_length - len(p)]
        out["input_ids"].append(p + a)
        out["completion_mask"].append([0] * len(p) + [1] * len(a))
        out["status"].append(status)
    return out
