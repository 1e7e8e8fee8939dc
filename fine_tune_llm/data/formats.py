"""The formats a data file may come in, told apart by its columns, and each row checked and turned into one example.

    format                   columns                                              trained on
    messages                 messages: [{role: system/user/assistant, content}]   every assistant turn (--train-on)
    sharegpt                 conversations: [{from: system/human/gpt, value}]     every gpt turn
    prompt-completion        prompt, completion: text, or message lists           the completion
    prompt-chosen-rejected   prompt, chosen, rejected: text, or message lists     chosen (rejected: evaluation, DPO)
    question-response        question, response_j[, response_k]                   response_j (response_k: rejected)
    instruction              instruction[, input], output                         output
    columns                  --columns question=Q,answer=A[,rejected=R][,system=S] or messages=M[,rejected=R]

messages and sharegpt rows may carry a `rejected` column: an alternative to the final assistant turn. A prompt given
as a message list may hold earlier turns (and a system message) and ends with a user turn.

An example is {row, question, answer, rejected}: the last user turn, the final assistant turn and its rejected
alternative (or None), with `row` the 1-based row number in the file. A row that is anything more than one user turn
and its answer also carries `messages`: the whole conversation (an optional system turn, then user and assistant
turns alternating, ending with the answer), roles and contents only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import parse_columns
from ..errors import DataError

# role names in the file -> our roles
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    rejected: str | None = None  # the column holding a rejected answer, where the format has one
    about: str = ""


# In detection order: the first whose required columns a file has is its format.
FORMATS = {f.name: f for f in (
    Format("messages", ("messages",), ("rejected",), "rejected", "OpenAI-style conversations (role, content)"),
    Format("sharegpt", ("conversations",), ("rejected",), "rejected", "ShareGPT conversations (from, value)"),
    Format("prompt-chosen-rejected", ("prompt", "chosen", "rejected"), (), "rejected", "TRL's preference rows"),
    Format("prompt-completion", ("prompt", "completion"), (), None, "TRL's prompt-completion rows"),
    Format("question-response", ("question", "response_j"), ("response_k",), "response_k",
           "a question and a chosen answer, optionally a rejected one (the psychology data)"),
    Format("instruction", ("instruction", "output"), ("input",), None, "Alpaca-style instruction rows"),
)}


@dataclass(frozen=True)
class DataFormat:
    """The format a file is read in, how it was chosen, and (format "columns") which column holds which field."""

    format: Format
    how: str  # "detected from the columns", "--data-format", "--columns"
    columns: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self.format.name

    @property
    def rejected_column(self) -> str | None:
        if self.columns is not None:
            return self.columns.get("rejected")
        return self.format.rejected

    def record(self) -> dict[str, Any]:
        return {"format": self.name, "chosen_by": self.how, "columns": self.columns}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> DataFormat | None:
        """The format a run recorded in splits.json (None for a record written before formats were recorded)."""
        if not record or not record.get("format"):
            return None
        columns = record.get("columns")
        fmt = FORMATS.get(record["format"]) or mapped(columns or {})
        return cls(fmt, record.get("chosen_by", "recorded"), columns)


def mapped(mapping: dict[str, str]) -> Format:
    """The "columns" format of a --columns mapping."""
    return Format("columns", tuple(mapping), (), "rejected" if "rejected" in mapping else None,
                  "your columns, named by --columns")


def choose(rows: list[dict[str, Any]], source: str, data_format: str = "auto",
           columns: str | dict[str, str] | None = None) -> DataFormat:
    """The format of `rows`: mapped by --columns, forced by --data-format, or detected from the columns."""
    found = set(rows[0]) if rows else set()
    if columns:
        mapping = parse_columns(columns) if isinstance(columns, str) else dict(columns)
        missing = [c for c in mapping.values() if c not in found]
        if missing:
            raise DataError(f"{source}: --columns names column(s) {', '.join(map(repr, missing))}, which the file "
                            f"lacks; found: {', '.join(sorted(found)) or 'no columns'}")
        return DataFormat(mapped(mapping), "--columns", mapping)
    if data_format not in ("auto", "columns"):
        fmt = FORMATS[data_format]
        missing = [c for c in fmt.required if c not in found]
        if missing:
            raise DataError(f"{source}: --data-format {fmt.name} needs column(s) {', '.join(missing)}; found: "
                            f"{', '.join(sorted(found)) or 'no columns'}")
        return DataFormat(fmt, "--data-format")
    for fmt in FORMATS.values():
        if set(fmt.required) <= found:
            return DataFormat(fmt, "detected from the columns")
    raise DataError(no_format_message(found, source))


def no_format_message(found: set[str], source: str) -> str:
    want = [c for c in ("question", "response_j") if c not in found]
    hint = ""
    if "prompt" in found:
        hint = " (a prompt column needs completion, or chosen and rejected)"
    elif {"chosen", "rejected"} <= found:
        hint = " (chosen and rejected need a prompt column: the turns before the answers)"
    return (f"{source}: missing column(s) {', '.join(want)}; expected (question, response_j, response_k) or "
            f"(instruction, input, output); found: {', '.join(sorted(found)) or 'no columns'}. Also read: messages, "
            f"conversations (ShareGPT), prompt + completion, prompt + chosen + rejected{hint}; other column names: "
            f"--columns question=COLUMN,answer=COLUMN[,rejected=COLUMN]")


# --- one row -------------------------------------------------------------------------------------------------------

class Where:
    """Where a value sits in the file: every error names the file, the row, the column, the turn and the field."""

    def __init__(self, source: str, row: int, column: str, turn: int | None = None, field: str | None = None):
        self.source, self.row, self.column, self.turn, self.field = source, row, column, turn, field

    def at(self, turn: int | None = None, field: str | None = None) -> Where:
        return Where(self.source, self.row, self.column, turn, field)

    def error(self, problem: str) -> DataError:
        place = f"{self.source}: row {self.row}, column {self.column!r}"
        if self.turn is not None:
            place += f", turn {self.turn}"
        if self.field is not None:
            place += f", field {self.field!r}"
        return DataError(f"{place}: {problem}")


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text(value: Any, where: Where, required: bool = True) -> str | None:
    """A text value: null, empty and non-text values are named."""
    if is_null(value):
        if not required:
            return None
        raise where.error("value is null")
    if not isinstance(value, str):
        raise where.error(f"expected text, got {type(value).__name__} {str(value)[:40]!r}")
    if required and not value.strip():
        raise where.error("text is empty")
    return value


def as_list(value: Any, where: Where) -> list[Any]:
    """A list of turns: parquet gives numpy arrays, CSV gives JSON text; anything else is named."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise where.error("text that starts like a list of turns but is not valid JSON") from None
    if is_null(value):
        raise where.error("value is null")
    if not isinstance(value, list):
        raise where.error(f"expected a list of {{role, content}} objects, got {type(value).__name__} "
                          f"{str(value)[:40]!r}")
    if not value:
        raise where.error("the conversation is empty")
    return value


def turn(item: Any, where: Where, roles: dict[str, str] | None = None) -> dict[str, str]:
    """One {role, content} (or ShareGPT {from, value}) object, as {role, content} with our role names."""
    if hasattr(item, "items") and not isinstance(item, dict):
        item = dict(item.items())
    if not isinstance(item, dict):
        raise where.error(f"expected an object with 'role' and 'content', got {type(item).__name__} "
                          f"{str(item)[:40]!r}")
    if roles is None:  # --columns messages=M: either shape, told by the keys
        roles = SHAREGPT_ROLES if "from" in item and "role" not in item else OPENAI_ROLES
    role_key, content_key = ("from", "value") if roles is SHAREGPT_ROLES else ("role", "content")
    for key in (role_key, content_key):
        if key not in item:
            raise where.error(f"no {key!r} field (the object has: {', '.join(map(str, item)) or 'nothing'})")
    role = item[role_key]
    if not isinstance(role, str) or role not in roles:
        known = ", ".join(dict.fromkeys(roles))
        raise where.at(where.turn, role_key).error(f"unknown role {role!r}; expected one of {known}")
    content = text(item[content_key], where.at(where.turn, content_key))
    return {"role": roles[role], "content": content}


def turns(value: Any, where: Where, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """A checked conversation: its turns as {role, content}, in an order a chat template accepts."""
    items = as_list(value, where)
    first = items[0] if isinstance(items[0], dict) else {}
    sharegpt = roles is SHAREGPT_ROLES or (roles is None and "from" in first and "role" not in first)
    conversation = [turn(item, where.at(t), roles) for t, item in enumerate(items, start=1)]
    check_order(conversation, where, "from" if sharegpt else "role")
    return conversation


def check_order(conversation: list[dict[str, str]], where: Where, role_key: str) -> None:
    """An optional system message first, then user and assistant turns alternating, starting with the user."""
    spoken = 0
    for t, m in enumerate(conversation, start=1):
        if m["role"] == "system":
            if t != 1:
                raise where.at(t, role_key).error("a system message may only come first")
            continue
        expected = "user" if spoken % 2 == 0 else "assistant"
        if m["role"] != expected:
            first = " (a conversation starts with a user turn)" if spoken == 0 else ""
            raise where.at(t, role_key).error(
                f"roles must alternate user/assistant after an optional system message: expected {expected!r}, "
                f"got {m['role']!r}{first}")
        spoken += 1


def listlike(value: Any) -> bool:
    """A list of messages: a list, a numpy array (parquet), or JSON text of a list of objects (CSV)."""
    if isinstance(value, str):
        return value.lstrip().startswith("[{")
    return isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, bytes))


def answer(value: Any, where: Where, what: str) -> str:
    """A completion, chosen or rejected answer: text, one assistant message, or a list holding one."""
    if isinstance(value, dict) or (hasattr(value, "items") and not hasattr(value, "tolist")):
        items = [value]
    elif listlike(value):
        items = as_list(value, where)
    else:  # text; anything else is named as not text
        return text(value, where)
    if len(items) != 1:
        raise where.error(f"expected one assistant turn, got {len(items)} turns")
    m = turn(items[0], where.at(1))
    if m["role"] != "assistant":
        raise where.at(1, "from" if "from" in items[0] else "role").error(
            f"the {what} answer must be an assistant turn, got {m['role']!r}")
    return m["content"]


def prompt(value: Any, where: Where) -> list[dict[str, str]]:
    """The turns before the answer: one user text, or a message list ending with a user turn."""
    if not listlike(value):
        return [{"role": "user", "content": text(value, where)}]
    conversation = turns(value, where)
    if conversation[-1]["role"] != "user":
        raise where.at(len(conversation), "role").error(
            f"the prompt must end with a user turn, got {conversation[-1]['role']!r}")
    return conversation


def example(row: int, conversation: list[dict[str, str]], rejected: str | None) -> dict[str, Any]:
    """{row, question, answer, rejected}, plus the whole conversation when it is more than one exchange."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    out: dict[str, Any] = {"row": row, "question": users[-1], "answer": conversation[-1]["content"],
                           "rejected": rejected}
    if len(conversation) != 2 or conversation[0]["role"] != "user":
        out["messages"] = conversation
    return out


def conversation_row(row: dict[str, Any], n: int, source: str, column: str, roles: dict[str, str] | None,
                     rejected_column: str | None) -> tuple[dict[str, Any], bool]:
    """A messages / ShareGPT / mapped conversation row: (example, whether a trailing user turn was dropped)."""
    where = Where(source, n, column)
    conversation = turns(row.get(column), where, roles)
    if not any(m["role"] == "assistant" for m in conversation):
        raise where.error("the conversation has no assistant turn: nothing to train on")
    dropped = conversation[-1]["role"] == "user"  # nothing answers it: not trained, not a prompt
    if dropped:
        conversation = conversation[:-1]
    rejected = None
    if rejected_column and rejected_column in row:
        rejected = answer(row[rejected_column], Where(source, n, rejected_column), "rejected")
    return example(n, conversation, rejected), dropped


def exchange_row(row: dict[str, Any], n: int, source: str, columns: dict[str, str]) -> dict[str, Any]:
    """A prompt/completion, prompt/chosen/rejected or --columns question/answer row."""
    conversation = prompt(row.get(columns["question"]), Where(source, n, columns["question"]))
    system = columns.get("system")
    if system:
        value = text(row.get(system), Where(source, n, system), required=False)
        if value and value.strip():
            if conversation[0]["role"] == "system":
                raise Where(source, n, system).error(f"the prompt in column {columns['question']!r} has its own "
                                                     f"system message")
            conversation = [{"role": "system", "content": value}, *conversation]
    chosen = answer(row.get(columns["answer"]), Where(source, n, columns["answer"]), "chosen")
    rejected = None
    if columns.get("rejected") and columns["rejected"] in row:
        rejected = answer(row[columns["rejected"]], Where(source, n, columns["rejected"]), "rejected")
    return example(n, [*conversation, {"role": "assistant", "content": chosen}], rejected)


def legacy_row(row: dict[str, Any], n: int, source: str, name: str) -> dict[str, Any]:
    """question/response_j/response_k and instruction/input/output rows, read as they always were."""
    def value(column: str, required: bool = True) -> str | None:
        return text(row.get(column), Where(source, n, column), required)

    if name == "question-response":
        return {"row": n, "question": value("question"), "answer": value("response_j"),
                "rejected": value("response_k", required="response_k" in row)}
    question = value("instruction")
    extra = value("input", required=False)
    if extra and extra.strip():
        question = f"{question}\n\n{extra}"
    return {"row": n, "question": question, "answer": value("output"), "rejected": None}


def read_row(row: dict[str, Any], n: int, source: str, fmt: DataFormat) -> tuple[dict[str, Any], bool]:
    """One checked example, and whether a trailing user turn was dropped from it."""
    name = fmt.name
    if name == "messages":
        return conversation_row(row, n, source, "messages", OPENAI_ROLES, "rejected")
    if name == "sharegpt":
        return conversation_row(row, n, source, "conversations", SHAREGPT_ROLES, "rejected")
    if name == "columns" and "messages" in fmt.columns:
        return conversation_row(row, n, source, fmt.columns["messages"], None, fmt.columns.get("rejected"))
    if name == "columns":
        return exchange_row(row, n, source, fmt.columns), False
    if name in ("prompt-completion", "prompt-chosen-rejected"):
        answer_column = "completion" if name == "prompt-completion" else "chosen"
        columns = {"question": "prompt", "answer": answer_column, "rejected": fmt.format.rejected}
        return exchange_row(row, n, source, {k: v for k, v in columns.items() if v}), False
    return legacy_row(row, n, source, name), False


# --- what an example holds -----------------------------------------------------------------------------------------

def conversation(ex: dict[str, Any]) -> list[dict[str, str]]:
    """The example's turns, ending with its answer."""
    if "messages" in ex:
        return [dict(m) for m in ex["messages"]]
    return [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}]


def with_answer(ex: dict[str, Any], text_: str) -> list[dict[str, str]]:
    """The example's conversation with another final answer (its rejected one, for a preference pair)."""
    turns_ = conversation(ex)
    return [*turns_[:-1], {"role": "assistant", "content": text_}]


def assistant_turns(ex: dict[str, Any]) -> int:
    return sum(m["role"] == "assistant" for m in ex["messages"]) if "messages" in ex else 1


def system_message(ex: dict[str, Any]) -> str | None:
    first = ex.get("messages", [{}])[0]
    return first.get("content") if first.get("role") == "system" else None
