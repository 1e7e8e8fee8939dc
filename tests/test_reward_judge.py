"""The reward-model judge: length-controlled pairs, training on content, its cache, and win-rate arithmetic."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from fine_tune_llm.eval import reward_judge as rj
from fine_tune_llm.eval import reward_pairs as rp
from fine_tune_llm.eval.judge_scores import score_generations, win_rate

KIND = ["kind", "gentle", "caring", "warm", "patient", "hopeful", "calm", "supportive"]
HARSH = ["stupid", "lazy", "pathetic", "weak", "worthless", "foolish", "useless", "selfish"]
FILL = ["you", "are", "so", "and", "very", "today", "really", "the"]
# Content, not length, separates the answers: the rejected one is as long or longer.
OPTIONS = rj.JudgeOptions(max_pairs=None, epochs=2.0, learning_rate=5e-4, batch_size=8)


def synthetic_rows(n: int = 300, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def answer(words: list[str], length: int) -> str:
        return " ".join(rng.choice(words if i % 2 == 0 else FILL) for i in range(length)) + "."

    rows = []
    for i in range(n):
        length = rng.randint(5, 10)
        rows.append({"question": f"question {i}: I feel {rng.choice(['sad', 'tired', 'lost'])}, what now?",
                     "response_j": answer(KIND, length), "response_k": answer(HARSH, length + rng.randint(0, 4))})
    return rows


def make_run(root, rows):
    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.rows import config_splits
    from fine_tune_llm.run import RunDir

    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config("tiny", dataset=str(data), output_dir=str(root / "run"), data_samples=None, test_fraction=0.2)
    run = RunDir.of(cfg.output_dir)
    run.write_config(cfg)
    run.save_splits(config_splits(cfg), cfg.dataset)
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("judge"), synthetic_rows())
    return run, rj.reward_judge(run, OPTIONS, progress=False)


# --- arithmetic -------------------------------------------------------------------------------------------------

def test_win_rate_counts_ties_half_with_a_bootstrap_interval():
    out = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert (out["wins"], out["ties"], out["losses"], out["questions"]) == (2, 1, 1, 4)
    assert out["win_rate"] == pytest.approx(0.625)
    lo, hi = out["ci95"]
    assert 0.0 <= lo < 0.625 < hi <= 1.0
    assert win_rate([1.0] * 5, [0.0] * 5)["ci95"] == [1.0, 1.0]
    assert win_rate([0.3] * 4, [0.3] * 4)["win_rate"] == 0.5
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_accuracy_of_margins():
    out = rj.accuracy([1.0, -1.0, 0.0, 2.0])
    assert out["accuracy"] == pytest.approx(0.625) and out["pairs"] == 4


# --- what the judge reads ---------------------------------------------------------------------------------------

def test_pairs_are_cut_to_one_length_and_end_their_turn(tiny_tokenizer):
    end = rp.end_ids(tiny_tokenizer)
    rows = [{"row": 1, "question": "q", "answer": "a kind and gentle answer that goes on and on", "rejected": "no"}]
    chosen, rejected = rj.encode_pairs(tiny_tokenizer, rows, None, end)
    assert chosen[0].prompt == rejected[0].prompt and len(chosen[0].tokens) > len(rejected[0].tokens) > 0
    c, r = rp.pair_sequences(chosen, rejected, "matched", 128, end)
    assert len(c[0]) == len(r[0]) and c[0][-len(end):] == end == r[0][-len(end):]
    assert tiny_tokenizer.decode(c[0][len(chosen[0].prompt):-len(end)]) != "a kind and gentle answer"
    half_c, half_r = rp.pair_sequences(chosen, rejected, "half", 128, end)
    assert len(half_c[0]) == len(half_r[0]) == len(chosen[0].prompt) + max(1, len(rejected[0].tokens) // 2) + len(end)
    inside_c, inside_r = rp.pair_sequences(chosen, rejected, "inside", 128, end, seed=3)
    n = len(inside_c[0]) - len(chosen[0].prompt) - len(end)
    assert len(inside_c[0]) == len(inside_r[0]) and len(rejected[0].tokens) // 2 <= n < len(rejected[0].tokens)
    whole_c, _ = rp.pair_sequences(chosen, rejected, "whole", 3, end)
    assert len(whole_c[0]) == len(chosen[0].prompt) + 3 + len(end)  # capped


def test_padding_is_never_the_end_of_turn(smollm_tokenizer):
    """SmolLM2's pad token is <|im_end|>, its end of turn: the judge must pad with another id."""
    end = rp.end_ids(smollm_tokenizer)
    assert smollm_tokenizer.pad_token_id in end or smollm_tokenizer.pad_token_id is None
    assert rp.judge_pad_id(smollm_tokenizer) not in end


# --- training and the cache -------------------------------------------------------------------------------------

def test_judge_learns_content_not_length(trained):
    _, judge = trained
    h = judge.record["heldout"]
    assert h["pairs"] >= 40
    assert h["longer_wins"]["accuracy"] < 0.2  # length alone points the wrong way here
    assert h["matched"]["accuracy"] >= 0.8 and h["matched"]["ci95"][0] > 0.6
    assert h["half"]["accuracy"] > 0.6


def test_generations_score_by_content(trained):
    _, judge = trained
    rng = random.Random(1)
    prompts = [f"new question {i}: I feel lost" for i in range(20)]
    harsh = [" ".join(rng.choice(HARSH) for _ in range(8)) + "." for _ in prompts]
    kind = [" ".join(rng.choice(KIND) for _ in range(6)) + "." for _ in prompts]
    out = score_generations(judge, prompts, {"base": harsh, "tuned": kind, "same": kind}, order=["base", "tuned", "same"])
    tuned, same = out["win_rates"]
    assert (tuned["stage"], tuned["over"]) == ("tuned", "base")
    assert tuned["matched"]["win_rate"] >= 0.8 and tuned["longer"] == 0.0
    assert same["raw"]["win_rate"] == 0.5 and same["raw"]["ties"] == 20  # identical answers tie
    assert out["columns"]["tuned"]["mean_reward"] > out["columns"]["base"]["mean_reward"]
    assert out["rewards"]["tuned"] == out["rewards"]["same"]


def test_a_cached_judge_is_reused_and_scores_as_the_fresh_one(trained, monkeypatch):
    run, fresh = trained
    monkeypatch.setattr(rj, "train_judge", lambda *a, **k: pytest.fail("retrained a judge whose inputs match"))
    cached = rj.reward_judge(run, OPTIONS, progress=False)
    assert cached.record == fresh.record
    prompts, answers = ["how do I cope?", "I feel sad"], ["you are weak.", "be gentle and patient with yourself."]
    assert cached.rewards(prompts, answers) == pytest.approx(fresh.rewards(prompts, answers), abs=1e-5)


def test_a_changed_option_or_split_retrains(trained, monkeypatch):
    import dataclasses

    run, _ = trained
    calls = []
    monkeypatch.setattr(rj, "train_judge", lambda run, cfg, options, inputs, progress: calls.append(inputs))
    rj.reward_judge(run, dataclasses.replace(OPTIONS, lora_r=8), progress=False)
    assert calls[-1]["options"]["lora_r"] == 8
    record = json.loads(run.splits_file.read_text())
    saved = run.splits_file.read_text()
    try:
        record["splits"]["train"]["sha256"] = "0" * 64
        run.splits_file.write_text(json.dumps(record))
        rj.reward_judge(run, OPTIONS, progress=False)
        assert len(calls) == 2 and calls[-1]["train_sha256"] == "0" * 64
    finally:
        run.splits_file.write_text(saved)


def test_a_killed_save_leaves_no_judge_and_keeps_the_old_one(trained, tmp_path, monkeypatch):
    """A failure after the adapter is written but before the record is: no reward_judge/ (a fresh run), the old
    judge untouched (a retrain), and no staging folder either way. A half-written folder from a SIGKILL is never
    taken for a judge."""
    run, _ = trained
    copy = make_run(tmp_path, synthetic_rows(120))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rj, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        rj.reward_judge(copy, rj.JudgeOptions(max_pairs=16, epochs=1.0), progress=False)
    assert not copy.reward_judge_dir.exists() and not copy.reward_judge_staging_dir.exists()

    shutil.copytree(run.reward_judge_dir, copy.reward_judge_staging_dir)  # as a SIGKILL before the rename leaves it
    assert rj.load_judge(copy, copy.read_config()) is None

    before = (run.reward_judge_dir / rj.JUDGE_FILE).read_text()
    with pytest.raises(KeyboardInterrupt):
        rj.reward_judge(run, OPTIONS, retrain=True, progress=False)
    assert (run.reward_judge_dir / rj.JUDGE_FILE).read_text() == before
    assert not run.reward_judge_staging_dir.exists()


def test_no_pairs_is_named_before_any_model_loads(tmp_path, monkeypatch):
    from fine_tune_llm.errors import DataError

    rows = [{"question": r["question"], "response_j": r["response_j"]} for r in synthetic_rows(40)]
    run = make_run(tmp_path, rows)
    monkeypatch.setattr(rj, "load_classifier", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(DataError, match="rejected"):
        rj.reward_judge(run, OPTIONS, progress=False)


def test_conversations_are_judged_on_their_final_answer(trained):
    _, judge = trained
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": "I feel lost"}]
    encoded = judge.answers([conversation, "I feel lost"], ["be kind.", "be kind."])
    assert encoded[0].tokens == encoded[1].tokens and len(encoded[0].prompt) > len(encoded[1].prompt)

