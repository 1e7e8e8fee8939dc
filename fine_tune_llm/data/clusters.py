"""Which prompts count as the same: identical ones, and near-duplicates (paraphrases) clustered together.

A prompt is a row's user turns (one question, or every user turn of a conversation), normalized: case,
punctuation and spacing ignored. Identical normalized prompts always share a cluster; prompts whose word sets
have a Jaccard similarity of at least the threshold are joined too, and clusters are the connected components of
that relation. Candidates come from datasketch's MinHash LSH and each is confirmed with the exact Jaccard
similarity, so every link is a real near-duplicate pair (LSH may miss one: how rarely is in docs/results.md).
Components chain (A like B, B like C puts A with C): too low a threshold joins most of a templated data set into
one cluster, which no test split can hold (docs/training.md says how the default was chosen).

The same machinery counts a held-out split's near-twins: test prompts with a training prompt at least that similar.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Iterable
from typing import Any

from ..config import TrainConfig
from . import formats

# Recorded in splits.json beside each row's key: what the split kept together at the least.
GROUP_KEY = "normalized user turns (case, punctuation and spacing ignored), joined in order"
METHOD = "minhash-lsh"
SHINGLES = "word set of the normalized user turns"
NUM_PERM = 128  # MinHash permutations: more = fewer missed pairs, slower hashing
MINHASH_SEED = 1  # datasketch's default: the hash functions, not the data's shuffle
# LSH is tuned this far below the threshold, so that pairs just above it are rarely missed (recall against a
# brute-force count: docs/results.md); the extra candidates cost one exact Jaccard each.
LSH_MARGIN = 0.2
REFERENCE_THRESHOLDS = (0.8, 0.7)  # the leakage levels measured before clustering (docs/results.md)


@functools.lru_cache(maxsize=1 << 16)  # dedupe, split and counts each ask for every row's key
def normalize_question(text: str) -> str:
    """Case, punctuation and spacing do not make a new question."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def group_key(example: dict[str, Any]) -> str:
    """Identical prompts: the same question, or a conversation with the same user turns (normalized, in order)."""
    if "messages" not in example:
        return normalize_question(example["question"])
    return " | ".join(normalize_question(m["content"]) for m in example["messages"] if m["role"] == "user")


def words(key: str) -> frozenset[str]:
    """The word set a group key's similarity is measured on (a conversation's user turns joined)."""
    return frozenset(key.split()) - {"|"}


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def settings(threshold: float) -> dict[str, Any]:
    """How the clusters were made: recorded in splits.json so a run says what its split kept together."""
    return {"method": METHOD, "threshold": threshold, "shingles": SHINGLES, "num_perm": NUM_PERM,
            "minhash_seed": MINHASH_SEED, "lsh_threshold": _lsh_threshold(threshold), "exact_groups": GROUP_KEY}


def _lsh_threshold(threshold: float) -> float:
    return round(max(0.05, threshold - LSH_MARGIN), 4)


class UnionFind:
    """Connected components over 0..n-1: `union` joins two, `find` names a component by one of its members."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving: later finds are shorter
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def similar_pairs(word_sets: list[frozenset[str]], threshold: float,
                  queries: list[frozenset[str]] | None = None) -> Iterable[tuple[int, int, float]]:
    """(i, j, exact Jaccard) for the pairs LSH proposes that are at or above `threshold`: i indexes `queries`
    (default: the word sets themselves, each pair once, i < j), j indexes `word_sets`. Empty sets match nothing."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=_lsh_threshold(threshold), num_perm=NUM_PERM)
    hashes = _minhashes(word_sets)
    with lsh.insertion_session() as session:
        for j, h in enumerate(hashes):
            if h is not None:
                session.insert(j, LeanMinHash(h))
    asked, own = (hashes, word_sets) if queries is None else (_minhashes(queries), queries)
    for i, h in enumerate(asked):
        for j in lsh.query(h) if h is not None else ():
            if queries is None and j <= i:
                continue
            s = jaccard(own[i], word_sets[j])
            if s >= threshold:
                yield i, j, s


def _minhashes(word_sets: list[frozenset[str]]) -> list[Any]:
    """One MinHash per non-empty word set (None for an empty one), hashed in bulk."""
    from datasketch import MinHash

    present = [i for i, w in enumerate(word_sets) if w]
    out: list[Any] = [None] * len(word_sets)
    made = MinHash.bulk([[t.encode() for t in sorted(word_sets[i])] for i in present], num_perm=NUM_PERM,
                        seed=MINHASH_SEED)
    for i, h in zip(present, made):
        out[i] = h
    return out


def cluster_labels(examples: list[dict[str, Any]], threshold: float) -> list[str]:
    """Each example's cluster, named by a hash of the cluster's smallest group key (so a cluster of one prompt is
    named like its key, and the name does not depend on the rows' order)."""
    keys = [group_key(ex) for ex in examples]
    distinct = list(dict.fromkeys(keys))
    components = UnionFind(len(distinct))
    for i, j, _ in similar_pairs([words(k) for k in distinct], threshold):
        components.union(i, j)
    members: dict[int, list[str]] = {}
    for i, key in enumerate(distinct):
        members.setdefault(components.find(i), []).append(key)
    name = {key: _label(min(keys_of)) for keys_of in members.values() for key in keys_of}
    return [name[k] for k in keys]


def _label(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def spread_picks(rows: list[dict[str, Any]], n: int, seed: int = 0,
                 threshold: float = TrainConfig.near_duplicate_threshold) -> list[dict[str, Any]]:
    """n rows from n distinct clusters of `rows`, drawn with the seed across all of them (fewer when there are
    fewer clusters). Clusters holding a multi-turn conversation come first, represented by one: they show whether
    a model answers the last turn in the light of the earlier ones."""
    clusters: dict[str, list[dict[str, Any]]] = {}
    for row, label in zip(rows, cluster_labels(rows, threshold)):
        clusters.setdefault(label, []).append(row)
    rng = random.Random(seed)
    order = sorted(clusters)
    rng.shuffle(order)
    picks = []
    for label in order:
        members = clusters[label]
        multi = [r for r in members if formats.assistant_turns(r) > 1]
        picks.append((not multi, rng.choice(multi or members)))
    picks.sort(key=lambda p: p[0])  # stable: the seeded order within each kind
    return [row for _, row in picks[:n]]


def nearest_train_similarity(train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
                             floor: float) -> dict[str, float]:
    """Each distinct test prompt (group key) -> the exact word-set Jaccard of its most similar training prompt,
    or 0.0 when none reaches `floor` (LSH proposes the candidates, the exact similarity confirms them)."""
    train_keys = list(dict.fromkeys(group_key(r) for r in train_rows))
    test_keys = list(dict.fromkeys(group_key(r) for r in test_rows))
    best = dict.fromkeys(test_keys, 0.0)
    pairs = similar_pairs([words(k) for k in train_keys], floor, queries=[words(k) for k in test_keys])
    for i, _j, s in pairs:
        best[test_keys[i]] = max(best[test_keys[i]], s)
    return best


def near_twin_leakage(train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
                      threshold: float) -> dict[str, Any]:
    """How many distinct test prompts have a training prompt with word-set Jaccard >= threshold: held-out rows
    the model may have memorised in other words. {"threshold", "test_questions", "with_near_twin", "fraction"}."""
    return _leakage(nearest_train_similarity(train_rows, test_rows, threshold), threshold)


def leakage_levels(train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
                   threshold: float) -> list[dict[str, Any]]:
    """near_twin_leakage at `threshold` and at the reference levels (0.8, 0.7), highest first, in one LSH pass."""
    levels = sorted({threshold, *REFERENCE_THRESHOLDS}, reverse=True)
    best = nearest_train_similarity(train_rows, test_rows, min(levels))
    return [_leakage(best, t) for t in levels]


def _leakage(best: dict[str, float], threshold: float) -> dict[str, Any]:
    hits = sum(s >= threshold for s in best.values())
    return {"threshold": threshold, "test_questions": len(best), "with_near_twin": hits,
            "fraction": round(hits / len(best), 4) if best else 0.0}


def describe_leakage(levels: list[dict[str, Any]]) -> str:
    """'test questions with a near-twin in train (word-set Jaccard >= 0.8 / 0.7): 1 / 3 of 200'."""
    if not levels:
        return "no test questions"
    at = " / ".join(f"{lv['threshold']:g}" for lv in levels)
    hits = " / ".join(str(lv["with_near_twin"]) for lv in levels)
    return (f"test questions with a near-twin in train (word-set Jaccard >= {at}): {hits} of "
            f"{levels[0]['test_questions']:,}")
