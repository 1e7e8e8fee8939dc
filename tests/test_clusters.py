"""Near-duplicate clusters: paraphrases stay in one split, splits.json records how, the test split's near-twins are
counted, and generated answers are asked of questions from distinct clusters."""

from __future__ import annotations

import json

import pytest

from fine_tune_llm.config import make_config
from fine_tune_llm.data import clusters
from fine_tune_llm.data import rows as data
from fine_tune_llm.data import splits as saved_splits
from fine_tune_llm.errors import ConfigError, DamagedFile
from fine_tune_llm.eval.evaluate import generation_prompts
from tests.conftest import REAL_DATA, need

EXAMS = "I feel anxious before exams, what can I do?"
EXAMS_AGAIN = "I feel so anxious before my exams, what can I do?"  # word-set Jaccard with EXAMS: 8 / 10 = 0.8
WORDS = ("apple", "river", "candle", "violin", "desert", "marble", "tunnel", "garden", "rocket", "pillow")


def distinct_questions(n: int) -> list[str]:
    """n questions sharing at most 3 of 6 words with each other (Jaccard <= 0.5): no near-duplicates."""
    return [f"How do I fix the {WORDS[i % 10]} {WORDS[i // 10 % 10]}{i}?" for i in range(n)]


def row(question: str, answer: str = "An answer.") -> dict:
    return {"question": question, "response_j": answer, "response_k": "A rejected one."}


def example(question: str, n: int = 1) -> dict:
    return {"row": n, "question": question, "answer": "A."}


def chat(*user_turns: str, n: int = 1) -> dict:
    messages = []
    for i, turn in enumerate(user_turns):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": f"Answer {i}."}]
    return {"row": n, "question": user_turns[-1], "answer": messages[-1]["content"], "messages": messages}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def straddles(splits) -> bool:
    """Whether EXAMS and its paraphrase are in two splits."""
    holders = {name for name, part in splits.items() for ex in part if ex["question"] in (EXAMS, EXAMS_AGAIN)}
    return len(holders) == 2


def test_paraphrases_never_straddle_splits_and_exact_grouping_alone_would_let_them(tmp_path):
    path = write(tmp_path / "d.jsonl", [row(EXAMS), row(EXAMS_AGAIN)] + [row(q) for q in distinct_questions(18)])
    straddled = 0
    for seed in range(12):
        split = data.load_splits(path, seed, val_fraction=0.3, test_fraction=0.3)
        assert not straddles(split)
        assert split.clustering["threshold"] == 0.8 and split.clustering["clusters"] == 19
        exact_only = data.load_splits(path, seed, val_fraction=0.3, test_fraction=0.3, near_duplicate_threshold=1.0)
        straddled += straddles(exact_only)
    assert straddled >= 3  # without the clustering the pair lands in two splits for several seeds


def test_identical_questions_share_a_cluster_and_unlike_ones_do_not():
    labels = clusters.cluster_labels([example("Hello?"), example("hello"), example(" HELLO !"), example("Goodbye")],
                                     threshold=1.0)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert labels[0] == saved_splits.key_hash(example("hello"))  # a one-prompt cluster is named like its key
    assert clusters.cluster_labels([example("?!"), example("...")], 0.8) == [clusters._label("")] * 2


def test_a_conversations_user_turns_drive_its_cluster():
    printer = chat("My printer is not printing.", "Yes, the light is green.")
    reworded = chat("my printer is not printing", "yes the light is green now")  # 9 / 10 of the words
    other_turn = chat("My printer is not printing.", "No, it says the paper tray is empty.")
    first_turn_alone = example("My printer is not printing.")
    labels = clusters.cluster_labels([printer, reworded, other_turn, first_turn_alone], 0.8)
    assert labels[0] == labels[1] and len({labels[0], labels[2], labels[3]}) == 3
    assert clusters.words(clusters.group_key(printer)) == {"my", "printer", "is", "not", "printing", "yes", "the",
                                                           "light", "green"}


def test_the_split_record_holds_the_clustering_and_each_rows_cluster(tmp_path):
    path = write(tmp_path / "d.jsonl", [row(EXAMS), row(EXAMS_AGAIN)] + [row(q) for q in distinct_questions(18)])
    split = data.load_splits(path, 3, val_fraction=0.2, test_fraction=0.2)
    saved_splits.save(tmp_path / "splits.json", split, path)
    record = json.loads((tmp_path / "splits.json").read_text())
    assert record["clustering"] == {**clusters.settings(0.8), "clusters": 19, "largest_cluster": 2}
    assert record["clustering"]["method"] == "minhash-lsh" and record["clustering"]["num_perm"] == 128
    every = [ex for part in split.values() for ex in part]
    for name, part in split.items():
        assert record["splits"][name]["row_cluster"] == [split.clusters[ex["row"]] for ex in part]
    pair = {split.clusters[ex["row"]] for ex in every if ex["question"] in (EXAMS, EXAMS_AGAIN)}
    assert len(pair) == 1 and len(set(split.clusters.values())) == 19
    assert [lv["threshold"] for lv in record["data"]["leakage"]] == [0.8, 0.7]
    loaded = saved_splits.load(tmp_path / "splits.json")
    assert loaded == split and loaded.clustering == record["clustering"] and loaded.clusters == split.clusters
    assert saved_splits.clustering(tmp_path / "splits.json") == record["clustering"]
    assert saved_splits.grouping_label(loaded.clustering).startswith("near-duplicate clusters (word-set Jaccard >= 0.8")


def test_an_old_splits_file_without_clustering_keeps_its_rows_and_is_labelled(tmp_path):
    path = write(tmp_path / "d.jsonl", [row(EXAMS), row(EXAMS_AGAIN)] + [row(q) for q in distinct_questions(18)])
    exact_only = (data.load_splits(path, s, val_fraction=0.3, test_fraction=0.3, near_duplicate_threshold=1.0)
                  for s in range(20))
    old = next(s for s in exact_only if straddles(s))  # a split as saved before clustering: the pair straddles
    record = saved_splits.membership(old, path)
    del record["clustering"]  # what training wrote before near-duplicate clustering
    for saved in record["splits"].values():
        del saved["row_cluster"]
    (tmp_path / "splits.json").write_text(json.dumps(record))
    loaded = saved_splits.load(tmp_path / "splits.json")
    assert {n: [ex["row"] for ex in p] for n, p in loaded.items()} == {n: [ex["row"] for ex in p]
                                                                       for n, p in old.items()}
    assert straddles(loaded)  # kept as saved, not re-split
    assert loaded.clustering is None and loaded.clusters == {}
    assert saved_splits.clustering(tmp_path / "splits.json") is None
    assert "saved before near-duplicate clustering" in saved_splits.grouping_label(loaded.clustering)


def test_a_splits_file_whose_clustering_lacks_row_clusters_is_damaged(tmp_path):
    path = write(tmp_path / "d.jsonl", [row(q) for q in distinct_questions(10)])
    record = saved_splits.membership(data.load_splits(path, 0, val_fraction=0.2, test_fraction=0.2), path)
    del record["splits"]["test"]["row_cluster"]
    (tmp_path / "splits.json").write_text(json.dumps(record))
    with pytest.raises(DamagedFile, match="split 'test' lacks a 'row_cluster' for each row"):
        saved_splits.load(tmp_path / "splits.json")


def test_leakage_counts_a_planted_near_twin_and_ignores_a_distinct_question():
    train = [example(EXAMS, 1), *(example(q, i + 2) for i, q in enumerate(distinct_questions(30)))]
    test = [example(EXAMS_AGAIN, 40), example("Why is the sky blue at noon?", 41), example(EXAMS_AGAIN, 42)]
    assert clusters.near_twin_leakage(train, test, 0.8) == {"threshold": 0.8, "test_questions": 2,
                                                            "with_near_twin": 1, "fraction": 0.5}
    assert clusters.near_twin_leakage(train, test, 0.85)["with_near_twin"] == 0  # 0.8 is below 0.85
    levels = clusters.leakage_levels(train, test, 0.9)
    assert [(lv["threshold"], lv["with_near_twin"]) for lv in levels] == [(0.9, 0), (0.8, 1), (0.7, 1)]
    assert clusters.describe_leakage(levels).endswith("(word-set Jaccard >= 0.9 / 0.8 / 0.7): 0 / 1 / 1 of 2")


def test_generation_picks_come_from_distinct_clusters_with_the_seed():
    rows = [example(EXAMS, 1), example(EXAMS_AGAIN, 2), example(EXAMS.lower(), 3)]
    rows += [example(q, i + 4) for i, q in enumerate(distinct_questions(20))]
    picks = [clusters.spread_picks(rows, 6, seed) for seed in range(8)]
    for chosen in picks:
        labels = clusters.cluster_labels(chosen, 0.8)
        assert len(chosen) == 6 and len(set(labels)) == 6
    assert clusters.spread_picks(rows, 6, 3) == picks[3]  # same seed, same picks
    assert len({tuple(ex["row"] for ex in p) for p in picks}) == 8  # other seeds, other picks
    drawn = {ex["row"] for p in picks for ex in p}
    assert len(drawn) >= 18 and max(drawn) == 23  # across the whole split, not its first rows
    assert len(clusters.spread_picks(rows, 50, 0)) == 21  # one per cluster at most


def test_generation_prompts_prefer_multi_turn_conversations_and_draw_one_per_cluster():
    rows = [example(EXAMS, 1), example(EXAMS_AGAIN, 2), chat("Hi there.", "Which exam tips work?", n=3)]
    rows += [example(q, i + 4) for i, q in enumerate(distinct_questions(5))]
    prompts = generation_prompts(rows, 3, seed=1)
    assert prompts[0] == [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Answer 0."},
                          {"role": "user", "content": "Which exam tips work?"}]
    assert len(prompts) == 3 and all(isinstance(p, str) for p in prompts[1:])
    assert not {EXAMS, EXAMS_AGAIN} <= set(prompts[1:])
    assert generation_prompts(rows, 3, seed=1) == prompts


def test_the_threshold_is_a_checked_option():
    assert make_config("tiny").near_duplicate_threshold == 0.8
    assert make_config("tiny", near_duplicate_threshold=0.9).near_duplicate_threshold == 0.9
    with pytest.raises(ConfigError, match="near_duplicate_threshold"):
        make_config("tiny", near_duplicate_threshold=0)


def test_the_real_data_split_as_the_cpu_preset_does_leaves_few_near_twins_in_test():
    cfg = make_config("smollm2-135m", dataset=str(need(REAL_DATA)), data_samples=2000)
    split = data.config_splits(cfg)
    assert len(split["validation"]) == 200 and 200 <= len(split["test"]) < 200 + split.clustering["largest_cluster"]
    at = {lv["threshold"]: lv for lv in split.summary["leakage"]}
    assert at[0.8]["test_questions"] > 100 and at[0.8]["fraction"] <= 0.05  # exact grouping alone: about a third
    assert split.clustering["largest_cluster"] < len(split["test"])
    exact = clusters.near_twin_leakage(split["train"], split["test"], 0.8)
    assert exact == at[0.8]
