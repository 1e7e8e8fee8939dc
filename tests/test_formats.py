"""Data formats: each is detected from its columns (or forced, or mapped with --columns), the same conversations read
the same in every format, the format is recorded with the split, and repeated conversations never straddle splits."""

from __future__ import annotations

import json

import pytest

from fine_tune_llm.config import make_config
from fine_tune_llm.data import rows as data
from fine_tune_llm.data import splits as saved_splits
from fine_tune_llm.data.formats import conversation
from fine_tune_llm.errors import ConfigError, DataError
from tests.conftest import chatterbot_rows

SYSTEM = "You answer questions about printers."
CONVERSATIONS = [
    [{"role": "user", "content": "My printer is not printing."}, {"role": "assistant", "content": "Is it on?"},
     {"role": "user", "content": "Yes, the light is green."}, {"role": "assistant", "content": "Try a test page."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is toner?"},
     {"role": "assistant", "content": "Powdered ink for laser printers."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
]
REJECTED = ["Buy a new one.", "No idea.", "Go away."]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_sharegpt(turns):
    return [{"from": SHAREGPT_NAMES[t["role"]], "value": t["content"]} for t in turns]


def same_examples(a, b):
    assert [{k: v for k, v in x.items() if k != "row"} for x in a] == [{k: v for k, v in x.items() if k != "row"}
                                                                       for x in b]


def test_each_format_is_detected_and_every_spelling_of_a_conversation_reads_the_same(tmp_path):
    messages = jsonl(tmp_path / "m.jsonl", [{"messages": c, "rejected": r} for c, r in zip(CONVERSATIONS, REJECTED)])
    sharegpt = jsonl(tmp_path / "s.jsonl", [{"conversations": as_sharegpt(c), "rejected": {"from": "gpt", "value": r}}
                                            for c, r in zip(CONVERSATIONS, REJECTED)])
    preference = jsonl(tmp_path / "p.jsonl", [{"prompt": c[:-1], "chosen": [c[-1]],
                                               "rejected": [{"role": "assistant", "content": r}]}
                                              for c, r in zip(CONVERSATIONS, REJECTED)])
    mapped = jsonl(tmp_path / "c.jsonl", [{"dialog": c, "bad": r} for c, r in zip(CONVERSATIONS, REJECTED)])
    read = {name: data.read_examples(data.read_rows(path), path, columns=cols)
            for name, path, cols in [("messages", messages, None), ("sharegpt", sharegpt, None),
                                     ("prompt-chosen-rejected", preference, None),
                                     ("columns", mapped, "messages=dialog,rejected=bad")]}
    for name, (examples, fmt) in read.items():
        assert fmt.name == name
        same_examples(examples, read["messages"][0])
    first, second, third = read["messages"][0]
    assert first == {"row": 1, "question": "Yes, the light is green.", "answer": "Try a test page.",
                     "rejected": "Buy a new one.", "messages": CONVERSATIONS[0]}
    assert second["messages"][0] == {"role": "system", "content": SYSTEM}
    assert third == {"row": 3, "question": "Hello", "answer": "Hi! How can I help?", "rejected": "Go away."}


def test_text_prompts_and_completions_are_one_exchange(tmp_path):
    path = jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is toner?", "completion": "Powdered ink."}])
    (ex,), fmt = data.read_examples(data.read_rows(path), path)
    assert fmt.name == "prompt-completion" and fmt.how == "detected from the columns"
    assert ex == {"row": 1, "question": "What is toner?", "answer": "Powdered ink.", "rejected": None}
    path = jsonl(tmp_path / "qa.jsonl", [{"Q": "What is toner?", "A": "Powdered ink.", "S": SYSTEM, "R": "Dust."}])
    (ex,) = data.to_examples(data.read_rows(path), path, columns="question=Q,answer=A,rejected=R,system=S")
    assert ex["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is toner?"},
                              {"role": "assistant", "content": "Powdered ink."}] and ex["rejected"] == "Dust."


def test_the_two_earlier_shapes_read_exactly_as_before(tmp_path):
    path = jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "response_j": "Kind.", "response_k": "Rude."}])
    assert data.read_examples(data.read_rows(path), path)[1].name == "question-response"
    assert data.load_examples(path) == [{"row": 1, "question": "Q?", "answer": "Kind.", "rejected": "Rude."}]
    path = jsonl(tmp_path / "i.jsonl", [{"instruction": "Do it", "input": "now", "output": "Done."}])
    assert data.load_examples(path) == [{"row": 1, "question": "Do it\n\nnow", "answer": "Done.", "rejected": None}]


def test_parquet_and_csv_hold_message_lists_too(tmp_path):
    import pandas as pd

    rows = [{"messages": c} for c in CONVERSATIONS]
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")  # read back as numpy arrays of dicts
    pd.DataFrame([{"messages": json.dumps(c)} for c in CONVERSATIONS]).to_csv(tmp_path / "m.csv", index=False)
    want = data.load_examples(jsonl(tmp_path / "m.jsonl", rows))
    assert data.load_examples(str(tmp_path / "m.parquet")) == want == data.load_examples(str(tmp_path / "m.csv"))


def test_a_forced_format_names_the_columns_it_lacks_and_no_format_lists_the_others(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(DataError, match=r"m.jsonl: --data-format sharegpt needs column\(s\) conversations; found: "
                                        r"messages"):
        data.load_examples(path, "sharegpt")
    path = jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"Also read: messages, conversations \(ShareGPT\).*a prompt column needs "
                                        r"completion.*--columns question=COLUMN,answer=COLUMN"):
        data.load_examples(path)
    with pytest.raises(DataError, match=r"x.jsonl: --columns names column\(s\) 'A', which the file lacks"):
        data.load_examples(path, columns="question=prompt,answer=A")


def test_columns_come_from_a_flag_or_a_yaml_mapping_and_bad_ones_are_named(tmp_path):
    from fine_tune_llm.cli.commands import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--preset", "tiny", "--columns", "question=Q,answer=A,rejected=R"])
    flag = config_from_args(args)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("columns:\n  question: Q\n  answer: A\n  rejected: R\n")
    assert make_config("tiny", yaml_file).columns == flag.columns == "question=Q,answer=A,rejected=R"
    for bad, message in [("question=Q", "answer missing"), ("prompt=Q,answer=A", "unknown field 'prompt'"),
                         ("question", "'question' is not FIELD=COLUMN"),
                         ("messages=M,question=Q", "messages=COLUMN holds whole conversations")]:
        with pytest.raises(ConfigError, match=message):
            make_config("tiny", columns=bad)
    with pytest.raises(ConfigError, match="--columns reads the data as format 'columns'"):
        make_config("tiny", columns="question=Q,answer=A", data_format="messages")
    with pytest.raises(ConfigError, match="option 'train_on' must be one of all, last"):
        make_config("tiny", train_on="first")


def test_a_trailing_user_turn_is_dropped_and_counted(tmp_path, caplog):
    import logging

    path = jsonl(tmp_path / "t.jsonl", [{"messages": [*CONVERSATIONS[0], {"role": "user", "content": "Hello?"}]}])
    with caplog.at_level(logging.INFO):
        (ex,) = data.load_examples(path)
    assert ex["messages"] == CONVERSATIONS[0]
    assert "dropped the final user turn of 1 conversation(s): no answer follows it (rows 1)" in caplog.text


def test_the_split_record_holds_the_format_the_mapping_and_each_rows_group(tmp_path):
    rows = [{"dialog": c, "category": "x"} for c in CONVERSATIONS * 8]
    path = jsonl(tmp_path / "d.jsonl", rows)
    splits = data.load_splits(path, seed=0, val_fraction=0.3, test_fraction=0.3, columns="messages=dialog")
    assert splits.summary["format"] == "columns" and splits.summary["duplicates_dropped"] == 21
    saved_splits.save(tmp_path / "splits.json", splits, path)
    record = json.loads((tmp_path / "splits.json").read_text())
    assert record["data"]["columns"] == {"messages": "dialog"} and record["data"]["multi_turn"] == 1
    assert record["data"]["group_key"] == data.GROUP_KEY
    for name, part in splits.items():
        assert record["splits"][name]["row_group"] == [saved_splits.key_hash(r) for r in part]
    loaded = saved_splits.load(tmp_path / "splits.json")  # read back through the recorded mapping
    assert loaded == splits and loaded.summary["format"] == "columns"


def test_group_keys_are_the_normalized_user_turns():
    a = {"row": 1, "question": "x", "answer": "y", "messages": [
        {"role": "system", "content": "S"}, *CONVERSATIONS[0]]}
    b = {"row": 2, "question": "x", "answer": "y", "messages": [
        {"role": "user", "content": "my printer is NOT printing"}, {"role": "assistant", "content": "Other."},
        {"role": "user", "content": "Yes -- the light is green!"}, {"role": "assistant", "content": "Other."}]}
    assert data.group_key(a) == data.group_key(b) == "my printer is not printing | yes the light is green"
    assert data.group_key({"question": "Hello?"}) == "hello"


def test_repeated_conversations_never_land_in_two_splits(tmp_path):
    rows = [{"messages": c} for c in CONVERSATIONS] * 5  # identical conversations, repeated
    rows += [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}"}]}
             for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": "Question 3?"}, {"role": "assistant", "content": "Other"}]}]
    path = jsonl(tmp_path / "r.jsonl", rows)
    for seed in range(6):
        splits = data.load_splits(path, seed=seed, val_fraction=0.2, test_fraction=0.2)
        holders: dict[str, set[str]] = {}
        for name, part in splits.items():
            for ex in part:
                holders.setdefault(data.group_key(ex), set()).add(name)
        assert all(len(h) == 1 for h in holders.values())
        assert len(holders["question 3"]) == 1 and sum(len(p) for p in splits.values()) == 3 + 31


def test_the_real_chatterbot_file_splits_without_leaks_and_keeps_its_multi_turn_conversations():
    rows = chatterbot_rows()
    assert len(rows) == 2026
    from tests.conftest import CHATTERBOT

    for seed in (0, 42):
        splits = data.load_splits(str(CHATTERBOT), seed=seed)
        assert splits.summary["format"] == "messages" and splits.summary["rows_read"] == 2026
        assert splits.summary["multi_turn"] == 69  # every multi-turn conversation survives the deduplication
        keys = {name: {data.group_key(ex) for ex in part} for name, part in splits.items()}
        assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
        assert not keys["validation"] & keys["test"]
        # The support questions are 1,050 exact repeats of 10 conversations: each is kept once...
        support = [ex for part in splits.values() for ex in part
                   if conversation(ex)[0]["content"].lower() == "my printer is not printing."]
        assert len(support) == 1
        # ...and a question asked with several answers ("Are you sentient?") is one group, in one split.
        sizes = {}
        for part in splits.values():
            for ex in part:
                sizes[data.group_key(ex)] = sizes.get(data.group_key(ex), 0) + 1
        assert sum(n > 1 for n in sizes.values()) > 50 and sizes["are you sentient"] == 3


def test_csv_prompts_and_answers_may_be_json_message_lists(tmp_path):
    import pandas as pd

    conv = CONVERSATIONS[0]
    pd.DataFrame([{"prompt": json.dumps(conv[:-1]), "chosen": json.dumps([conv[-1]]), "rejected": "No."}]).to_csv(
        tmp_path / "p.csv", index=False)
    (ex,) = data.load_examples(str(tmp_path / "p.csv"))
    assert ex["messages"] == conv and ex["rejected"] == "No."
