"""Loading, seeded shuffling, DATA_SAMPLES and the question-level split."""

import json

from fine_tune_llm.data.clusters import normalize_question
from fine_tune_llm.data.rows import SAMPLE_DATA, load_splits, read_rows, to_examples
from tests.conftest import REAL_DATA, need


def questions(split):
    return {normalize_question(ex["question"]) for ex in split}


def assert_no_leak(splits):
    train, val, test = (questions(splits[k]) for k in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test


def test_shipped_sample_has_the_real_schema():
    rows = read_rows(SAMPLE_DATA)
    assert 100 <= len(rows) <= 200
    assert all(set(r) == {"question", "response_j", "response_k"} for r in rows)


def test_split_by_question_has_no_leak_and_covers_every_row():
    splits = load_splits("sample", seed=1)
    assert_no_leak(splits)
    assert sum(len(s) for s in splits.values()) == len(read_rows(SAMPLE_DATA))
    assert all(len(s) > 0 for s in splits.values())


def test_near_duplicate_questions_stay_together(tmp_path):
    rows = [{"question": q, "response_j": f"kind answer {i}", "response_k": "rude"}
            for i, q in enumerate(["How do I sleep better?", "how do I sleep  better", "HOW DO I SLEEP BETTER?!"]
                                  + [f"Question number {i}?" for i in range(40)])]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    for seed in range(5):
        splits = load_splits(str(path), seed=seed, val_fraction=0.2, test_fraction=0.2)
        assert_no_leak(splits)
        holders = [k for k, s in splits.items() if "how do i sleep better" in questions(s)]
        assert len(holders) == 1


def test_data_samples_keeps_n_rows_and_seed_fixes_the_order():
    a = load_splits("sample", seed=7, data_samples=50)
    b = load_splits("sample", seed=7, data_samples=50)
    c = load_splits("sample", seed=8, data_samples=50)
    assert sum(len(s) for s in a.values()) == 50
    assert a == b
    order = lambda s: [ex["row"] for k in ("train", "validation", "test") for ex in s[k]]
    assert order(a) != order(c)


def test_instruction_rows_plug_in(tmp_path):
    path = tmp_path / "support.csv"
    path.write_text("instruction,input,output\nReset my password,,Click 'Forgot password'.\n"
                    "Summarise the ticket,Printer is jammed again,Printer jam; needs a technician.\n")
    ex = to_examples(read_rows(path), str(path))
    assert ex[0] == {"row": 1, "question": "Reset my password", "answer": "Click 'Forgot password'.",
                     "rejected": None}
    assert ex[1]["question"] == "Summarise the ticket\n\nPrinter is jammed again"


def test_real_dataset_split_has_no_question_leak():
    splits = load_splits(str(need(REAL_DATA)), seed=42)
    assert sum(len(s) for s in splits.values()) <= 9846
    assert_no_leak(splits)
    assert 0.08 < len(splits["test"]) / 9846 < 0.12
    assert all(ex["rejected"] for ex in splits["test"])
