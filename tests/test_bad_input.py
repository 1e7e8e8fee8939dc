"""The foundation's bad-input list: each case ends in our error naming the file, row, column or option.

Covered elsewhere: unknown preset and unreadable flag values (test_config, test_cli), a system role folded into
the first user turn (test_chat), blank/huge/duplicate rows and odd encodings (test_hostile_input).
"""

from __future__ import annotations

import json
import logging

import pytest

from fine_tune_llm.config import make_config
from fine_tune_llm.data.rows import load_splits, read_rows, to_examples
from fine_tune_llm.errors import DataError

GOOD = {"question": "Why can't I focus?", "response_j": "That sounds draining.", "response_k": "Try harder."}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path):
    return to_examples(read_rows(path), str(path))


def test_missing_file_is_named(tmp_path):
    for name in ("nope.csv", "nope.jsonl", "notes.txt"):
        with pytest.raises(DataError, match=f"data file not found: {tmp_path / name}$"):
            read_rows(tmp_path / name)
    with pytest.raises(DataError, match="data file not found: notes.txt"):
        read_rows("notes.txt")  # no slash and an extension: a file, not a Hub id


def test_unknown_format_names_the_file_and_the_formats(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("question\tresponse_j\n")
    with pytest.raises(DataError, match=r"data.txt: unknown data format '.txt'; use one of .parquet, .csv, .jsonl"):
        read_rows(path)


def test_unreadable_files_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"question": "unterminated\n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        read_rows(path)
    path = tmp_path / "broken.json"
    path.write_text('[{"question": "a"},\n {"question": ]')
    with pytest.raises(DataError, match=r"broken.json: not valid JSON at line 2"):
        read_rows(path)
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(["a", "b"]) + "\n")
    with pytest.raises(DataError, match=r"list.jsonl: row 2 is a list, not an object with named columns"):
        read_rows(path)
    path = tmp_path / "fake.parquet"
    path.write_text("question,response_j\n")
    with pytest.raises(DataError, match=r"fake.parquet: not a readable parquet file"):
        read_rows(path)


def test_missing_column_names_what_is_missing_and_what_was_found(tmp_path):
    path = jsonl(tmp_path / "cols.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cols.jsonl: missing column\(s\) question, response_j; expected "
                                        r"\(question, response_j, response_k\) or \(instruction, input, output\); "
                                        r"found: answer, prompt"):
        load(path)
    path = jsonl(tmp_path / "half.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"half.jsonl: missing column\(s\) response_j;"):
        load(path)
    path = jsonl(tmp_path / "ragged.jsonl", [GOOD, {"question": "Only a question?"}])
    with pytest.raises(DataError, match=r"ragged.jsonl: row 2, column 'response_j': value is null"):
        load(path)


@pytest.mark.parametrize("value, message", [
    (None, "value is null"),
    ("", "text is empty"),
    ("  \n\t", "text is empty"),
    (42, "expected text, got int '42'"),
    (["a", "list"], "expected text, got list"),
    ({"nested": "dict"}, "expected text, got dict"),
    (True, "expected text, got bool"),
])
def test_null_empty_or_non_string_text_names_row_and_column(tmp_path, value, message):
    path = jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD | {"question": "Second?"}, GOOD | {"response_j": value}])
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: row 3, column 'response_j': {message}")


def test_nan_in_a_parquet_file_is_a_null(tmp_path):
    import pandas as pd

    path = tmp_path / "nan.parquet"
    pd.DataFrame([GOOD, GOOD | {"question": float("nan")}]).to_parquet(path)
    with pytest.raises(DataError, match=r"nan.parquet: row 2, column 'question': value is null"):
        load(path)
    pd.DataFrame([GOOD, GOOD | {"question": "Other?", "response_k": None}]).to_parquet(path)
    with pytest.raises(DataError, match=r"nan.parquet: row 2, column 'response_k': value is null"):
        load(path)  # a rejected answer is optional as a column, but not row by row


def test_a_prompt_longer_than_max_length_is_skipped_and_counted(tmp_path, tiny_tokenizer, caplog):
    from fine_tune_llm.train.sft import prepare_data, tokenize_split

    rows = [GOOD | {"question": f"Question {n}?"} for n in range(6)]
    rows[4]["question"] = "Why? " * 200
    examples = load(jsonl(tmp_path / "long.jsonl", rows))
    cfg = make_config("tiny", max_length=64)
    with caplog.at_level(logging.WARNING):
        ds = tokenize_split(examples, tiny_tokenizer, cfg, "train")
    assert "train: skipped 1 row(s) that do not fit max_length=64: the prompt alone fills it" in caplog.text
    assert "(rows 5)" in caplog.text
    assert ds["row"] == [1, 2, 3, 4, 6]
    # When nothing trainable is left, say so instead of letting the Trainer fail on an empty sampler.
    path = jsonl(tmp_path / "all_long.jsonl", [GOOD | {"question": f"{n} " + "Why? " * 200} for n in range(10)])
    with pytest.raises(DataError, match=r"all_long.jsonl: no training rows \(all 8 were skipped: their prompts "
                                        r"fill max_length=64; raise --max-length\)"):
        prepare_data(make_config("tiny", dataset=str(path), max_length=64), tiny_tokenizer)
    with pytest.raises(DataError, match=r"no training rows \(the split kept none of 2 rows; raise --data-samples"):
        prepare_data(make_config("tiny", data_samples=2), tiny_tokenizer)


def test_bad_data_through_the_cli_is_one_line_without_traceback(tmp_path, capsys):
    from fine_tune_llm.cli import main

    path = jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD | {"response_j": 7}])
    assert main(["train", "--preset", "tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: row 2, column 'response_j': expected text, got int '7'\n"


def test_splits_report_rows_by_their_number_in_the_file(tmp_path):
    rows = [GOOD | {"question": f"Question number {n}?"} for n in range(20)]
    splits = load_splits(str(jsonl(tmp_path / "rows.jsonl", rows)), seed=1)
    numbers = sorted(e["row"] for part in splits.values() for e in part)
    assert numbers == list(range(1, 21))
