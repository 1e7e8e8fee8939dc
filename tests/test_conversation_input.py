"""Bad conversational input: one error naming the file, the row, the turn and the field, before any tokenizer or
model loads, without a traceback, and nothing written."""

from __future__ import annotations

import json

import pytest

from fine_tune_llm.data.rows import load_examples
from fine_tune_llm.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Is my printer on?"}, {"role": "assistant", "content": "Yes."}]}


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (row written as row 2, after a good row 1) -> the error after "FILE: row 2, "
CASES = {
    "roles that do not alternate": (
        {"messages": turns(("user", "Hi"), ("assistant", "Hello"), ("assistant", "Anyone?"))},
        ("column 'messages', turn 3, field 'role': roles must alternate user/assistant after an optional system "
         "message: expected 'user', got 'assistant'")),
    "a conversation that starts with the assistant": (
        {"messages": turns(("system", "Be kind."), ("assistant", "Hello"), ("user", "Hi"))},
        ("column 'messages', turn 2, field 'role': roles must alternate user/assistant after an optional system "
         "message: expected 'user', got 'assistant' (a conversation starts with a user turn)")),
    "a system message after the first turn": (
        {"messages": turns(("user", "Hi"), ("system", "Be kind."), ("assistant", "Hello"))},
        "column 'messages', turn 2, field 'role': a system message may only come first"),
    "an unknown role": (
        {"messages": turns(("user", "Hi"), ("tool", "{}"))},
        "column 'messages', turn 2, field 'role': unknown role 'tool'; expected one of system, user, assistant"),
    "an unknown ShareGPT role": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
        ("column 'conversations', turn 2, field 'from': unknown role 'bot'; expected one of system, human, gpt, "
         "user, assistant")),
    "no assistant turn": (
        {"messages": turns(("system", "Be kind."), ("user", "Hi"))},
        "column 'messages': the conversation has no assistant turn: nothing to train on"),
    "empty content": (
        {"messages": turns(("user", "Hi"), ("assistant", "  \n"))},
        "column 'messages', turn 2, field 'content': text is empty"),
    "null content": (
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "Hello"}]},
        "column 'messages', turn 1, field 'content': value is null"),
    "non-text content": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x.png"}]},
                      {"role": "assistant", "content": "Nice."}]},
        "column 'messages', turn 1, field 'content': expected text, got list"),
    "messages that are not a list": (
        {"messages": "Hi there"}, "column 'messages': expected a list of {role, content} objects, got str"),
    "a turn that is not an object": (
        {"messages": [{"role": "user", "content": "Hi"}, "Hello"]},
        "column 'messages', turn 2: expected an object with 'role' and 'content', got str 'Hello'"),
    "a turn without content": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "text": "Hello"}]},
        "column 'messages', turn 2: no 'content' field (the object has: role, text)"),
    "an empty conversation": ({"messages": []}, "column 'messages': the conversation is empty"),
    "a chosen answer that is not an assistant turn": (
        {"prompt": turns(("user", "Hi")), "chosen": turns(("user", "Hello")),
         "rejected": turns(("assistant", "Go away"))},
        "column 'chosen', turn 1, field 'role': the chosen answer must be an assistant turn, got 'user'"),
    "a chosen answer of several turns": (
        {"prompt": "Hi", "chosen": turns(("assistant", "Hello"), ("user", "Hm")), "rejected": "Go away"},
        "column 'chosen': expected one assistant turn, got 2 turns"),
    "a prompt that ends with the assistant": (
        {"prompt": turns(("user", "Hi"), ("assistant", "Hello")), "chosen": "More?", "rejected": "No."},
        "column 'prompt', turn 2, field 'role': the prompt must end with a user turn, got 'assistant'"),
}


def good_first(bad: dict) -> dict:
    """A good row 1 in the same format as the bad row 2, so the error must name the right row."""
    if "conversations" in bad:
        return {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    if "prompt" in bad:
        return {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}
    return GOOD


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_bad_conversation_names_the_row_the_turn_and_the_field(tmp_path, case):
    bad, message = CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good_first(bad)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}: row 2, {message}")


def test_a_bad_row_stops_training_before_anything_loads_or_is_written(tmp_path, capsys, monkeypatch):
    from fine_tune_llm.cli import main
    from fine_tune_llm.model import loading
    from fine_tune_llm.train import sft

    bad, message = CASES["roles that do not alternate"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")

    def must_not_load(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded before the data was checked")

    for module in (loading, sft):
        monkeypatch.setattr(module, "load_tokenizer", must_not_load)
        monkeypatch.setattr(module, "load_model", must_not_load)
    run_dir = tmp_path / "run"
    for command in (["train"], ["data", str(path)]):
        args = [*command, "--preset", "tiny", "--dataset", str(path), "--output-dir", str(run_dir)]
        assert main(args) == 2
        assert capsys.readouterr().err == f"error: {path}: row 2, {message}\n"  # one line, no traceback
    assert not run_dir.exists()
