"""Evaluation: hand-made perplexity / bits per byte / preference cases, batch-size invariance, generation stops
at the end of the turn, the before/after report, and one check on the real small chat model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fine_tune_llm.config import make_config
from fine_tune_llm.data.chat_template import build_messages, render_prompt
from fine_tune_llm.eval import scoring
from fine_tune_llm.eval.evaluate import eval_rows, load_for_eval
from fine_tune_llm.model.generation import generate_answers
from fine_tune_llm.run import RunDir
from tests.conftest import train_tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_DATA = SHARED / "data" / "psychology-dataset" / "psychology_dataset.parquet"


# --- hand-made cases: a bigram "model" whose log-probs are known in closed form ------------------------------

class Bigram(torch.nn.Module):
    """logits at position t depend only on token t: p(next | prev) = softmax(table[prev])."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


TABLE = [[0.0, 1.0, 2.0, 0.5], [2.0, 0.0, 1.0, -1.0], [0.3, 0.3, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def log_p(nxt: int, prev: int) -> float:
    row = TABLE[prev]
    return row[nxt] - math.log(sum(math.exp(x) for x in row))


def test_perplexity_is_exp_of_token_weighted_loss_computed_by_hand():
    # Two sequences, answers of 2 and 5 tokens (mask 1), after a prompt (mask 0).
    seqs = [[0, 1, 2, 3], [3, 0, 2, 2, 1, 0, 3]]
    masks = [[0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    by_hand = [-(log_p(2, 1) + log_p(3, 2)),
               -(log_p(2, 0) + log_p(2, 2) + log_p(1, 2) + log_p(0, 1) + log_p(3, 0))]
    for batch_size in (1, 2):
        nats, tokens = scoring.score_tokens(Bigram(TABLE), seqs, masks, pad_id=3, batch_size=batch_size,
                                            progress=False)
        assert nats == pytest.approx(by_hand, abs=1e-5)
        assert tokens == [2, 5]
    ppl = scoring.perplexity(sum(nats), sum(tokens))
    assert ppl == pytest.approx(math.exp(sum(by_hand) / 7), rel=1e-6)
    # Not the mean of per-sequence means, which would weight the 2-token answer like the 5-token one.
    assert ppl != pytest.approx(math.exp((by_hand[0] / 2 + by_hand[1] / 5) / 2), rel=1e-3)


def test_bits_per_byte_by_hand(tiny_tokenizer):
    assert scoring.bits_per_byte(12 * math.log(2), 6) == pytest.approx(2.0)
    # Bytes are UTF-8 bytes of the answer text as scored (stripped; the end-of-turn token adds none).
    answers = ["Ça va, très bien.", "  plain ascii  "]
    enc = scoring.encode_answers(tiny_tokenizer, ["q1", "q2"], answers, max_length=256)
    assert enc["bytes"] == [len("Ça va, très bien.".encode()), len("plain ascii")] == [19, 11]
    scored = scoring.Scored(nats=[19 * math.log(2), 11 * 3 * math.log(2)], tokens=[5, 4], bytes=enc["bytes"],
                            kept=[0, 1])
    assert scoring.language_metrics(scored)["bits_per_byte"] == pytest.approx((19 + 33) / 30)


def test_preference_accuracy_margin_and_length_bias_on_a_hand_made_case():
    # pair 1: per-token tie (-1 vs -1), chosen wins on the sum; pair 2: chosen wins per token (-1 vs -2) but,
    # being longer, loses on the sum; pair 3: rejected wins both ways.
    chosen = ([2.0, 10.0, 3.0], [2, 10, 1])
    rejected = ([3.0, 4.0, 1.0], [3, 2, 1])
    m = scoring.preference_metrics(chosen, rejected, n_boot=500)
    assert m["pairs"] == 3
    assert m["accuracy_normalized"] == pytest.approx(0.5)  # tie counts half: (0.5 + 1 + 0) / 3
    assert m["accuracy_sum"] == pytest.approx(1 / 3)
    assert m["mean_margin"] == pytest.approx((0 + 1 - 2) / 3)
    assert m["mean_margin_sum"] == pytest.approx((1 - 6 - 2) / 3)
    assert m["chosen_longer"] == pytest.approx(1 / 3)
    lo, hi = m["margin_ci95"]
    assert -2 <= lo <= m["mean_margin"] <= hi <= 1


def test_bootstrap_ci_covers_the_mean_and_narrows_with_more_data():
    assert scoring.bootstrap_ci([0.25] * 50) == (0.25, 0.25)
    gen = torch.Generator().manual_seed(0)
    small = (torch.randn(50, generator=gen) + 1).tolist()
    large = (torch.randn(5000, generator=gen) + 1).tolist()
    lo_s, hi_s = scoring.bootstrap_ci(small)
    lo_l, hi_l = scoring.bootstrap_ci(large)
    assert lo_s < sum(small) / 50 < hi_s and lo_l < sum(large) / 5000 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~ 1/sqrt(n): 10x narrower for 100x the data
    assert hi_l - lo_l == pytest.approx(2 * 1.96 / math.sqrt(5000), rel=0.15)


# --- the tiny model, tuned for a few steps --------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, _ = train_tiny(tmp_path_factory.mktemp("evaluation"), "runs/tiny-eval", max_steps=8, logging_steps=4,
                        eval_steps=8, save_steps=8)
    return cfg


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from fine_tune_llm.model.loading import load_tokenizer

    return load_tokenizer(make_config("tiny"))


@pytest.fixture(scope="module")
def tuned(run):
    model, tokenizer = load_for_eval(run, Path(run.output_dir) / "adapter")
    return model, tokenizer, eval_rows(RunDir.of(run.output_dir), "test")


def test_eval_split_is_the_held_out_test_split_training_built(run, tiny_tokenizer):
    from fine_tune_llm.train.sft import prepare_data

    splits, tokenized = prepare_data(run, tiny_tokenizer)
    rows = eval_rows(RunDir.of(run.output_dir), "test")
    assert rows == splits["test"] and len(rows) == 16
    train_questions = {r["question"] for r in splits["train"]} | {r["question"] for r in splits["validation"]}
    assert not train_questions & {r["question"] for r in rows}
    # Evaluation masks exactly the tokens training learns.
    enc = scoring.encode_answers(tiny_tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows],
                                 run.max_length, run.system_prompt)
    assert enc["input_ids"] == tokenized["test"]["input_ids"]
    assert enc["completion_mask"] == tokenized["test"]["completion_mask"]


def test_perplexity_does_not_depend_on_batch_size(tuned):
    model, tokenizer, rows = tuned
    rows = rows[:10]  # batch 8 then: one full batch and one of 2
    args = ([r["question"] for r in rows], [r["answer"] for r in rows], 256)
    one = scoring.score_answers(model, tokenizer, *args, batch_size=1, progress=False)
    eight = scoring.score_answers(model, tokenizer, *args, batch_size=8, progress=False)
    assert one.tokens == eight.tokens
    ppl_1 = scoring.perplexity(one.total_nats, one.total_tokens)
    ppl_8 = scoring.perplexity(eight.total_nats, eight.total_tokens)
    assert ppl_1 == pytest.approx(ppl_8, abs=1e-4)
    assert one.nats == pytest.approx(eight.nats, abs=1e-4)


def test_tuned_generation_stops_at_end_of_turn_and_left_padding_changes_nothing(tuned, run):
    model, tokenizer, rows = tuned
    saved = json.loads((Path(run.output_dir) / "adapter" / "generation_config.json").read_text())
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert sorted(saved["eos_token_id"]) == sorted([tokenizer.eos_token_id, end_of_turn])
    questions = [r["question"] for r in rows[:4]]
    batched = generate_answers(model, tokenizer, questions, max_new_tokens=48, batch_size=4, progress=False)
    stopped = [a for a in batched if not a["hit_max_tokens"]]
    assert len(stopped) >= 3  # a model tuned for 8 steps may still loop on one question; that is recorded
    for a in batched:
        assert a["stopped_on"] == ("<end_of_turn>" if a in stopped else None)
        assert a["new_tokens"] < 48 if a in stopped else a["new_tokens"] == 48
        assert "<end_of_turn>" not in a["answer"]
    # Alone, the shortest prompt gets no padding; in the batch it got the most, on the left.
    lengths = [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    shortest = lengths.index(min(lengths))
    assert min(lengths) < max(lengths)
    alone = generate_answers(model, tokenizer, [questions[shortest]], max_new_tokens=48, progress=False)
    assert alone[0]["answer"] == batched[shortest]["answer"]

    # With gemma-2b-it's own stopping rule (<eos> only), the same answer runs on past the end of its turn.
    first = stopped[0]
    prompt = tokenizer(render_prompt(tokenizer, build_messages(first["question"])), add_special_tokens=False,
                       return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=first["new_tokens"] + 8, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[first["new_tokens"] - 1] == end_of_turn and len(new) > first["new_tokens"]


def test_fine_tuning_on_chosen_answers_raises_preference_accuracy(tiny_tokenizer):
    """20 pairs; the tiny model was pre-trained on the rejected answers, so it starts by preferring them."""
    import dataclasses

    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.model.loading import load_model

    cfg = make_config("tiny")
    pairs = load_splits("sample", cfg.seed)["train"][:20]
    q, chosen, rejected = ([p[k] for p in pairs] for k in ("question", "answer", "rejected"))
    # A plain float32 full fine-tune: this test is about the measure, so it uses the fastest way to move.
    model = load_model(dataclasses.replace(cfg, quantization="none", dtype="float32"))

    def preference():
        model.eval()
        j = scoring.score_answers(model, tiny_tokenizer, q, chosen, 256, progress=False)
        k = scoring.score_answers(model, tiny_tokenizer, q, rejected, 256, progress=False)
        return scoring.preference_metrics((j.nats, j.tokens), (k.nats, k.tokens))

    before = preference()
    enc = scoring.encode_answers(tiny_tokenizer, q, chosen, 256)
    width = max(map(len, enc["input_ids"]))
    pad = [width - len(ids) for ids in enc["input_ids"]]
    ids = torch.tensor([x + [0] * p for x, p in zip(enc["input_ids"], pad)])
    attention = torch.tensor([[1] * len(x) + [0] * p for x, p in zip(enc["input_ids"], pad)])
    labels = torch.tensor([[t if m else -100 for t, m in zip(x, mk)] + [-100] * p
                           for x, mk, p in zip(enc["input_ids"], enc["completion_mask"], pad)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    after = preference()
    assert before["accuracy_normalized"] <= 0.1
    assert after["accuracy_normalized"] >= before["accuracy_normalized"] + 0.5
    assert after["mean_margin"] > before["mean_margin"] + 3
    assert after["margin_ci95"][0] > before["margin_ci95"][1]


def test_evaluate_command_writes_report_and_runs_csv(run, tmp_path, capsys):
    from fine_tune_llm.cli import main
    from fine_tune_llm.eval.report import append_runs_csv

    run_dir = Path(run.output_dir)
    assert main(["evaluate", str(run_dir), "--metrics-dir", str(tmp_path), "--n-generations", "2",
                 "--max-new-tokens", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads((run_dir / "report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    for m in (base, tuned):
        assert m["answers"] == 16 and m["pairs"] == 16
        assert m["perplexity"] == pytest.approx(math.exp(m["nats"] / m["answer_tokens"]))
        assert m["bits_per_byte"] == pytest.approx(m["nats"] / math.log(2) / m["answer_bytes"])
        assert m["margin_ci95"][0] <= m["mean_margin"] <= m["margin_ci95"][1]
    assert tuned["answer_tokens"] == base["answer_tokens"]  # same data, same tokens
    assert tuned["perplexity"] < 0.9 * base["perplexity"]  # 8 steps on response_j move the tiny model
    assert tuned["mean_margin"] > base["mean_margin"]
    assert report["deltas"]["perplexity"] == pytest.approx(tuned["perplexity"] - base["perplexity"])
    assert report["global_step"] == 8 and report["config"]["max_steps"] == 8
    assert report["libraries"]["torch"] and "commit" in report["git"] and report["wall_seconds"] > 0
    greedy = report["generations"]["greedy"]
    assert len(greedy) == 2 == len(report["generations"]["sampled"])
    assert {"answer", "new_tokens", "hit_max_tokens", "seconds"} <= set(greedy[0]["tuned"])
    md = (run_dir / "report.md").read_text()
    assert "| Perplexity" in md and "length-normalized" in md and greedy[0]["question"][:20] in md

    append_runs_csv(tmp_path / "runs.csv", report)  # a second evaluation adds a row under the same header
    with open(tmp_path / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and rows[0]["run"] == "tiny-eval" and rows[0]["split"] == "test"
    assert float(rows[0]["tuned_perplexity"]) == pytest.approx(tuned["perplexity"])


# --- the real small chat model ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not (SMOL_GGUF.is_file() and REAL_DATA.is_file()), reason="../shared model and data absent")
def test_untuned_smollm2_prefers_the_empathetic_answer_per_token():
    from fine_tune_llm.data.rows import load_splits
    from fine_tune_llm.eval.evaluate import score_model

    cfg = make_config("smollm2-135m", base_model=str(SMOL_GGUF), dataset=str(REAL_DATA))
    rows = load_splits(cfg.dataset, cfg.seed, None, cfg.val_fraction, cfg.test_fraction)["test"][:16]
    model, tokenizer = load_for_eval(cfg)
    m = score_model(model, tokenizer, cfg, rows, batch_size=8)
    assert m["pairs"] == 16
    assert m["accuracy_normalized"] >= 0.8  # ~98% on the whole held-out split
    assert m["mean_margin"] > 0 and m["margin_ci95"][0] > 0
    # response_j is the longer answer, so the raw sum favours response_k: the bias the report warns about.
    assert m["chosen_longer"] >= 0.9 and m["accuracy_sum"] < m["accuracy_normalized"] - 0.3


def test_the_base_column_is_a_plain_float32_forward_of_the_released_weights(run):
    """The report's base column scores the unquantized weights as released, not the 4-bit copy training used."""
    from transformers import AutoModelForCausalLM

    from fine_tune_llm.eval.evaluate import load_columns
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.model.tiny import tiny_model_dir

    runs = RunDir.of(run.output_dir)
    rows = eval_rows(runs, "test")[:4]
    tok = load_tokenizer(run)
    columns = load_columns(runs, runs.read_config())
    args = ([r["question"] for r in rows], [r["answer"] for r in rows], run.max_length)
    with columns.use("base") as model:
        ours = scoring.score_answers(model, tok, *args, batch_size=2, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    enc = scoring.encode_answers(tok, *args)
    for ids, mask, nats in zip(enc["input_ids"], enc["completion_mask"], ours.nats):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = plain(input_ids=x).logits[0, :-1]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        want = torch.nn.functional.cross_entropy(logits[keep], x[0, 1:][keep], reduction="sum").item()
        assert nats == pytest.approx(want, rel=1e-5)  # fp32 both sides: only summation order differs
