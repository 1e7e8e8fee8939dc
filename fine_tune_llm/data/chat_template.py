"""Chat formatting and tokenization: conversations -> token ids with a mask over exactly the assistant turns.

Why our own tokenization instead of TRL's: TRL trains on everything the template writes after the prompt,
which for Gemma is `answer<end_of_turn>\\n`, and on multi-turn rows its assistant masks need a template with
`{% generation %}` markers, which neither Gemma's nor most ChatML templates have. Here every assistant turn is
found by rendering the conversation up to it with the model's own template: the loss covers each answer and the
template's end-of-turn token(s) exactly, never a system or user turn or a role header, for any template that
renders a conversation as a prefix of its continuation (checked on every row). One `<bos>`; control strings are
stripped from every turn so a row cannot forge one.
"""

from __future__ import annotations

from typing import Any

from ..config import TRAIN_ON
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
# A row longer than max_length keeps its first answer only if at least this many answer tokens fit after its prompt.
MIN_ANSWER_TOKENS = 8


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


def supports_system(tokenizer) -> bool:
    """Whether the chat template writes a system turn (ChatML does; Gemma's raises on one)."""
    from jinja2 import TemplateError

    probe = [{"role": "system", "content": "SYSTEM-PROBE"}, {"role": "user", "content": "q"}]
    try:
        return "SYSTEM-PROBE" in tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The configured system prompt first, for a conversation that carries no system message of its own."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def prepare_turns(tokenizer, messages: list[dict[str, str]], controls: list[str] | None = None,
                  system_ok: bool | None = None) -> list[dict[str, str]]:
    """The turns as the template gets them: control strings stripped from every turn, each answer stripped of
    surrounding whitespace (as the answer's tokens are), and a system message kept where the template has a system
    role, folded into the first user turn where it refuses one."""
    controls = control_strings(tokenizer) if controls is None else controls
    clean = []
    for m in messages:
        content = sanitize(m["content"], controls)
        clean.append({"role": m["role"], "content": content.strip() if m["role"] == "assistant" else content})
    if clean and clean[0]["role"] == "system" and not (supports_system(tokenizer) if system_ok is None else system_ok):
        clean = fold_system(clean)
    return clean


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The generation prompt for a conversation ending with a user turn; every turn sanitized, as in training."""
    return tokenizer.apply_chat_template(prepare_turns(tokenizer, messages), tokenize=False, add_generation_prompt=True)


def segments(tokenizer, turns: list[dict[str, str]], end: str, row: Any = None) -> list[tuple[str, str]]:
    """(text before the answer, answer + end of turn) for each assistant turn: their concatenation is the template's
    rendering of the conversation, up to the last answer's end-of-turn.

    Each "text before" is what the template writes between the previous answer's end and this answer (the trailing
    newline, the user turn, the role header); it is the template's own generation prompt for the turns so far, minus
    what was already written. A template that renders earlier turns differently once later ones follow (one that
    drops earlier reasoning, say) would make the masks wrong: it is refused, naming the row and turn."""
    out, done = [], ""
    for i, m in enumerate(turns):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
        if not prefix.startswith(done):
            raise _drift(row, i)
        answer = m["content"] + end
        out.append((prefix[len(done):], answer))
        done = prefix + answer
    if not tokenizer.apply_chat_template(turns, tokenize=False).startswith(done):
        raise _drift(row, len(turns))
    return out


def _drift(row: Any, turn: int) -> DataError:
    where = f"row {row}, turn {turn}" if row is not None else f"turn {turn}"
    return DataError(f"{where}: the chat template renders this conversation differently once later turns follow, "
                     f"so a mask over its answers cannot be exact; use a template that renders each turn the same "
                     f"way wherever it stands")


def encode_conversations(tokenizer, conversations: list[list[dict[str, str]]], max_length: int,
                         train_on: str = "all", rows: list[Any] | None = None) -> dict[str, list[Any]]:
    """Tokenize conversations (each ending with an assistant turn): input_ids, completion_mask and per-row counts.

    completion_mask is 1 on every assistant turn's answer and end-of-turn token(s) (train_on="all"), or on the final
    answer only ("last"), and 0 on everything else. status: "ok"; "cut" (later turns did not fit in max_length and
    were dropped whole: the row ends at the last answer that fits); "truncated" (a conversation's only answer does not
    fit: it is cut at max_length, as a single-turn row is); "too_long" (the text before the first answer leaves
    fewer than MIN_ANSWER_TOKENS, or a conversation of several answers cannot fit its first: the caller skips such
    rows and counts them). Also per row: turns (assistant turns
    in the conversation), turns_kept, turns_trained, full_length (tokens of the whole conversation, uncut) and
    answer_bytes (UTF-8 bytes of the trained answers' text as scored; the end-of-turn token adds none).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    controls, end, system_ok = control_strings(tokenizer), turn_end(tokenizer), supports_system(tokenizer)
    pieces = [segments(tokenizer, prepare_turns(tokenizer, c, controls, system_ok), end,
                       rows[n] if rows is not None else None) for n, c in enumerate(conversations)]
    flat = [text for row in pieces for pair in row for text in pair]
    # The rendered text holds <bos> already where the template writes one: add_special_tokens=False keeps it to one.
    ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "completion_mask", "status", "turns", "turns_kept",
                                                 "turns_trained", "full_length", "answer_bytes")}
    for row in pieces:
        tokens = [(next(ids), next(ids)) for _ in row]
        _assemble(tokenizer, out, row, tokens, max_length, train_on, end)
    return out


def _assemble(tokenizer, out: dict[str, list[Any]], row: list[tuple[str, str]], tokens: list[tuple[list, list]],
              max_length: int, train_on: str, end: str) -> None:
    """One row's ids and mask from its segments' tokens, cut at a turn boundary where it exceeds max_length."""
    ids: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (start, end, segment index) of each kept answer
    status = "ok"
    for k, (p, a) in enumerate(tokens):
        if k == 0 and len(p) >= max_length - MIN_ANSWER_TOKENS:
            status, a = "too_long", a[:1]
        elif k == 0 and len(p) + len(a) > max_length and len(tokens) > 1:
            # A conversation whose first answer does not fit is skipped (and counted), not cut: its later turns
            # could never be trained, and a cut first answer teaches a turn that never ends.
            status, a = "too_long", a[:1]
        elif k == 0 and len(p) + len(a) > max_length:  # a single answer is truncated, as the one-turn shapes are
            status, a = "truncated", a[: max_length - len(p)]
        elif k > 0 and len(ids) + len(p) + len(a) > max_length:
            status = "cut"
            break
        spans.append((len(ids) + len(p), len(ids) + len(p) + len(a), k))
        ids += p + a
        if status != "ok":
            break
    trained = spans if train_on == "all" else spans[-1:]
    mask = [0] * len(ids)
    for start, stop, _ in trained:
        mask[start:stop] = [1] * (stop - start)
    if status in ("ok", "cut"):  # whole answers: their text, without the end-of-turn markup
        answer_bytes = sum(len(row[k][1][: len(row[k][1]) - len(end)].encode("utf-8")) for _, _, k in trained)
    else:  # only the tokens that fit were scored: count the bytes of exactly those
        answer_bytes = len(tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
                           .encode("utf-8"))
    out["input_ids"].append(ids)
    out["completion_mask"].append(mask)
    out["status"].append(status)
    out["turns"].append(len(tokens))
    out["turns_kept"].append(len(spans))
    out["turns_trained"].append(len(trained))
    out["full_length"].append(sum(len(p) + len(a) for p, a in tokens))
    out["answer_bytes"].append(answer_bytes)


def completion_texts(tokenizer, answers: list[str], controls: list[str] | None = None) -> list[str]:
    """Each answer as training learns it and scoring scores it: sanitized, stripped, then the template's end of
    turn (the answer mask covers it, so a model is taught, and judged on, ending its turn)."""
    controls = control_strings(tokenizer) if controls is None else controls
    end = turn_end(tokenizer)
    return [sanitize(a, controls).strip() + end for a in answers]


def encode_batch(tokenizer, prompts: list[list[dict[str, str]]], answers: list[str],
                 max_length: int) -> dict[str, list[Any]]:
    """Tokenize prompt+answer pairs (each prompt a conversation ending with a user turn): encode_conversations."""
    conversations = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    return encode_conversations(tokenizer, conversations, max_length)
