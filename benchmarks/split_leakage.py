"""Near-twin leakage of the held-out split against the near-duplicate threshold, on the real psychology parquet:
for 2,000 rows (the CPU preset's `--data-samples 2000`) and for all 9,846, split with the presets' seed and 10% /
10% fractions. Per threshold: clusters, the largest cluster (rows), the rows each split got, the distinct test
questions, and how many have a training question with word-set Jaccard >= 0.8, >= 0.7 and >= the threshold, as
the split reports them (LSH candidates, exact Jaccard) and by brute force (every test x train pair, numpy); the
seconds to read, cluster and split (load_splits), and to cluster alone. "exact" is the split before near-duplicate
clustering (identical normalized questions grouped, groups in order of first appearance), for comparison.

    python benchmarks/split_leakage.py

Writes metrics/bench_split_leakage.csv; results: docs/results.md ("Near-duplicate clusters and the held-out split").
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter

import numpy as np
from common import REAL_DATA, REPO, cpu_description, load_average, write_csv

THRESHOLDS = ("exact", 1.0, 0.9, 0.85, 0.8, 0.78, 0.75, 0.7)
COLUMNS = ["rows", "threshold", "clusters", "largest_cluster", "train", "validation", "test", "test_questions",
           "twins_0.8", "twins_0.7", "twins_at_threshold", "brute_force_0.8", "brute_force_0.7", "load_split_s",
           "cluster_s", "load_average", "device"]


def exact_split(examples: list[dict], seed: int, data_samples: int | None) -> dict:
    """The split as it was before near-duplicate clustering: identical normalized questions grouped, groups taken in
    the order their first row appears after the seeded shuffle."""
    import random

    from fine_tune_llm.data.clusters import group_key

    rows = list(examples)
    random.Random(seed).shuffle(rows)
    rows = rows[:data_samples] if data_samples else rows
    groups: dict[str, list] = {}
    for ex in rows:
        groups.setdefault(group_key(ex), []).append(ex)
    want = {"test": 0.1 * len(rows), "validation": 0.1 * len(rows)}
    out: dict[str, list] = {"train": [], "validation": [], "test": []}
    for members in groups.values():
        out[next((s for s in ("test", "validation") if len(out[s]) < want[s]), "train")].extend(members)
    return out


def brute_force_best(train: list[dict], test: list[dict]) -> np.ndarray:
    """Each distinct test question's highest word-set Jaccard with any training question, every pair computed."""
    from fine_tune_llm.data.clusters import group_key, words

    train_sets = [words(k) for k in dict.fromkeys(group_key(r) for r in train)]
    test_sets = [words(k) for k in dict.fromkeys(group_key(r) for r in test)]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*train_sets, *test_sets)))}

    def incidence(sets):
        m = np.zeros((len(sets), len(vocab)), dtype=np.float32)
        for i, s in enumerate(sets):
            m[i, [vocab[w] for w in s]] = 1
        return m

    a, b = incidence(train_sets), incidence(test_sets)
    inter = b @ a.T
    union = b.sum(1)[:, None] + a.sum(1)[None, :] - inter
    return (inter / np.maximum(union, 1)).max(1)


def measure(examples: list[dict], threshold, data_samples: int | None, seed: int) -> dict:
    from fine_tune_llm.data import clusters
    from fine_tune_llm.data.rows import load_splits

    t0 = time.perf_counter()
    if threshold == "exact":
        splits, clustering = exact_split(examples, seed, data_samples), None
        levels = clusters.leakage_levels(splits["train"], splits["test"], 0.8)
    else:
        splits = load_splits(str(REAL_DATA), seed, data_samples, near_duplicate_threshold=threshold)
        clustering, levels = splits.clustering, splits.summary["leakage"]
    load_split_s = time.perf_counter() - t0
    kept = [ex for part in splits.values() for ex in part]
    t0 = time.perf_counter()
    labels = clusters.cluster_labels(kept, 1.0 if threshold == "exact" else threshold)
    cluster_s = time.perf_counter() - t0
    at = {lv["threshold"]: lv for lv in levels}
    best = brute_force_best(splits["train"], splits["test"])
    return {"rows": len(kept), "threshold": threshold,
            "clusters": clustering["clusters"] if clustering else len(set(labels)),
            "largest_cluster": clustering["largest_cluster"] if clustering else max(Counter(labels).values()),
            **{name: len(part) for name, part in splits.items()}, "test_questions": levels[0]["test_questions"],
            "twins_0.8": at[0.8]["with_near_twin"], "twins_0.7": at[0.7]["with_near_twin"],
            "twins_at_threshold": at[threshold]["with_near_twin"] if threshold in at else "",
            "brute_force_0.8": int((best >= 0.8).sum()), "brute_force_0.7": int((best >= 0.7).sum()),
            "load_split_s": round(load_split_s, 2), "cluster_s": round(cluster_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=42, help="the presets' seed")
    p.add_argument("--out", default=str(REPO / "metrics" / "bench_split_leakage.csv"))
    a = p.parse_args()
    logging.disable(logging.WARNING)  # an over-full split's warning is what the columns show
    from fine_tune_llm.data.rows import drop_duplicates, load_examples

    examples = drop_duplicates(load_examples(REAL_DATA))
    rows = []
    for data_samples in (2000, None):
        for threshold in THRESHOLDS:
            row = {**measure(examples, threshold, data_samples, a.seed), "load_average": round(load_average(), 1),
                   "device": cpu_description()}
            print({k: v for k, v in row.items() if k != "device"}, flush=True)
            rows.append(row)
    print(f"wrote {write_csv(a.out, rows, COLUMNS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
