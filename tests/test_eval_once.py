"""Evaluation does each thing once: a column is one scoring pass over every sequence it needs, and the columns'
generations share batches (peft's mixed adapters). Every number must equal the one-set-at-a-time, column-by-column
evaluation it replaced, whose functions are copied here as the reference: on a preference run (base / SFT /
SFT+DPO) and on a multi-turn run, whose final answers are scored apart from its conversations."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fine_tune_llm.data.formats import assistant_turns, with_answer
from fine_tune_llm.data.rows import SAMPLE_DATA
from fine_tune_llm.data.tokenized import encode_examples
from fine_tune_llm.eval import evaluate
from fine_tune_llm.eval.evaluate import (
    compare_generations,
    eval_rows,
    evaluate_run,
    generation_prompts,
    length_summary,
    load_columns,
)
from fine_tune_llm.eval.scoring import Scored, language_metrics, preference_metrics, score_tokens
from fine_tune_llm.eval.shared_trunk import SharedTrunk
from fine_tune_llm.model.generation import BASE, generate_columns
from fine_tune_llm.model.loading import load_tokenizer
from fine_tune_llm.run import RunDir
from fine_tune_llm.train.lineage import preference_config
from fine_tune_llm.train.preference import train_preference
from tests.conftest import train_tiny

STEPS = {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 2}


# --- the reference: evaluation as it was, each set scored and each column generated on its own -----------------

def reference_score_examples(model, tokenizer, examples, max_length, system_prompt, train_on, batch_size):
    enc = encode_examples(tokenizer, list(examples), max_length, system_prompt, train_on)
    kept = [i for i, s in enumerate(enc["status"]) if s != "too_long"]
    nats, tokens = score_tokens(model, [enc["input_ids"][i] for i in kept], [enc["completion_mask"][i] for i in kept],
                                pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size, progress=False)
    return Scored(nats, tokens, [enc["answer_bytes"][i] for i in kept], kept, [enc["status"][i] for i in kept])


def reference_score_model(model, tokenizer, cfg, rows, batch_size=8, seed=0):
    kwargs = {"max_length": cfg.max_length, "system_prompt": cfg.system_prompt, "batch_size": batch_size}
    chosen = reference_score_examples(model, tokenizer, rows, train_on=cfg.train_on, **kwargs)
    metrics = language_metrics(chosen)
    pair_rows = [i for i, r in enumerate(rows) if r.get("rejected")]
    if not pair_rows:
        metrics["pairs"] = 0
        return metrics
    pairs = [rows[i] for i in pair_rows]
    if cfg.train_on == "last" or all(assistant_turns(r) == 1 for r in pairs):
        final = chosen.subset(pair_rows)
    else:
        final = reference_score_examples(model, tokenizer, pairs, train_on="last", **kwargs)
    rejected = reference_score_examples(model, tokenizer, [{**r, "messages": with_answer(r, r["rejected"])}
                                                           for r in pairs], train_on="last", **kwargs)
    f_at = {i: n for n, i in enumerate(final.kept) if final.status[n] != "cut"}
    r_at = {i: n for n, i in enumerate(rejected.kept) if rejected.status[n] != "cut"}
    both = [(f_at[i], r_at[i]) for i in range(len(pairs)) if i in f_at and i in r_at]
    metrics.update(preference_metrics(([final.nats[j] for j, _ in both], [final.tokens[j] for j, _ in both]),
                                      ([rejected.nats[k] for _, k in both], [rejected.tokens[k] for _, k in both]),
                                      seed=seed))
    return metrics


@torch.inference_mode()
def reference_greedy(model, tokenizer, questions, max_new_tokens, batch_size, system_prompt, do_sample=False,
                     seed=0):
    from transformers import set_seed

    from fine_tune_llm.data.chat_template import render_prompt, with_system
    from fine_tune_llm.model.generation import generation_config

    gen = generation_config(tokenizer, getattr(model, "generation_config", None))
    gen.update(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if not do_sample:
        gen.update(temperature=None, top_p=None, top_k=None)
    else:
        set_seed(seed)  # each column reseeded: the same global stream, consumed batch by batch
    stop_ids = set(gen.eos_token_id)
    conversations = [[{"role": "user", "content": q}] if isinstance(q, str) else list(q) for q in questions]
    prompts = [render_prompt(tokenizer, with_system(c, system_prompt)) for c in conversations]
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt")
        ids = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:].tolist()
        for new in ids:
            stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
            kept = new if stop is None else new[:stop]
            out.append({"answer": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        "new_tokens": len(kept) + (stop is not None), "hit_max_tokens": stop is None,
                        "stopped_on": None if stop is None else tokenizer.convert_ids_to_tokens(new[stop])})
    return out


def reference_columns_greedy(columns, tokenizer, questions, max_new_tokens, system_prompt, batch_size=8,
                             do_sample=False, seed=0):
    answers = {}
    for name in columns.names:
        with columns.use(name) as model:
            answers[name] = reference_greedy(model, tokenizer, questions, max_new_tokens, batch_size, system_prompt,
                                             do_sample, seed)
    return answers


# --- runs -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-once")
    # LoRA on the top block only: the columns share the block below it (eval/shared_trunk.py)
    _cfg, sft = train_tiny(root, "sft", lora_layers=1, **STEPS)
    cfg = preference_config(sft.run.path, learning_rate=5e-3, max_steps=2, eval_steps=2, save_steps=2,
                            logging_steps=1)
    return train_preference(cfg, resume=False).run


@pytest.fixture(scope="module")
def multiturn_run(tmp_path_factory):
    """Two exchanges from the shipped sample per conversation (train_on all trains both answers), the second
    answer's rejected alternative kept: the final answer is then scored apart from its conversation."""
    root = tmp_path_factory.mktemp("eval-once-multiturn")
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines() if line.strip()]
    convs = []
    for one, two in zip(rows[0::2], rows[1::2]):
        messages = [{"role": "user", "content": one["question"]}, {"role": "assistant", "content": one["response_j"]},
                    {"role": "user", "content": two["question"]}, {"role": "assistant", "content": two["response_j"]}]
        convs.append({"messages": messages, "rejected": two["response_k"]})
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    # max_length 512: two exchanges of the sample outgrow the preset's 256, and a cut pair is not compared
    cfg, result = train_tiny(root, "sft", dataset=str(data), max_length=512, **STEPS)
    assert cfg.train_on == "all"
    return result.run


def assert_close(ours, want, path=""):
    """Every number within 1e-5 (relative for large ones), every other value equal, the same keys."""
    if isinstance(want, dict):
        assert set(ours) == set(want), path
        for key in want:
            assert_close(ours[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(ours) == len(want), path
        for n, (a, b) in enumerate(zip(ours, want)):
            assert_close(a, b, f"{path}[{n}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(ours), path
    elif isinstance(want, float):
        assert ours == pytest.approx(want, rel=1e-5, abs=1e-5), path
    else:
        assert ours == want, path


def check_against_reference(run: RunDir, tmp_path, n_generations: int, rows_per_batch: int):
    report = evaluate_run(run, n_generations=n_generations, max_new_tokens=16, metrics_dir=tmp_path,
                          progress=False, generation_rows=rows_per_batch)
    cfg = run.read_config()
    rows, tokenizer = eval_rows(run, "test"), load_tokenizer(cfg)
    columns = load_columns(run, cfg)
    want = {}
    for name in columns.names:
        with columns.use(name) as model:
            want[name] = reference_score_model(model, tokenizer, cfg, rows)
    assert_close(report["metrics"], want)
    questions = generation_prompts(rows, n_generations)
    greedy = reference_columns_greedy(columns, tokenizer, questions, 16, cfg.system_prompt)
    ours = report["generations"]["greedy"]
    assert [g["question"] for g in ours] == [q if isinstance(q, str) else q[-1]["content"] for q in questions]
    for name in columns.names:
        assert [{k: g[name][k] for k in greedy[name][0]} for g in ours] == greedy[name], (name, [g[name]["answer"] for g in ours], [a["answer"] for a in greedy[name]])
    lengths = length_summary({"greedy": [{n: greedy[n][i] for n in columns.names} for i in range(len(questions))]},
                             columns.names)
    assert report["generation_lengths"] == lengths
    return report, columns, questions


def test_a_preference_run_reports_the_same_numbers_and_greedy_answers_as_column_by_column(preference_run, tmp_path,
                                                                                          monkeypatch):
    from fine_tune_llm.train import preference_logps

    packed, pack = [], preference_logps.packed_pair_logps
    monkeypatch.setattr(preference_logps, "packed_pair_logps",
                        lambda model, prompts, *a, **k: packed.append(len(prompts)) or pack(model, prompts, *a, **k))
    trunks = []
    monkeypatch.setattr(evaluate, "SharedTrunk", lambda model: trunks.append(SharedTrunk(model)) or trunks[-1])
    # 3 columns x 2 modes x 5 questions in batches of 7: batches that split a column's questions and mix columns.
    report, columns, _questions = check_against_reference(preference_run, tmp_path, 5, 7)
    assert columns.names == ["base", "sft", "tuned"] and report["metrics"]["tuned"]["pairs"] == 16
    # Each column ran every pair's chosen and rejected answer in one row, the prompt once (the reference: apart).
    assert packed == [16, 16, 16]
    # The base column ran block 0 and kept what enters block 1; the adapters' columns started there, every call.
    [trunk] = trunks
    assert trunk.first == 1 and len(trunk.kept) == trunk.calls > 0
    # The three columns differ, so the mixed batches kept each row on its own adapter.
    assert len({report["metrics"][n]["perplexity"] for n in columns.names}) == 3
    answers = [tuple(g[n]["answer"] for g in report["generations"]["greedy"]) for n in columns.names]
    assert len(set(answers)) >= 2


def test_a_multi_turn_run_reports_the_same_numbers_as_column_by_column(multiturn_run, tmp_path):
    report, _columns, questions = check_against_reference(multiturn_run, tmp_path, 3, 4)
    assert report["metrics"]["base"]["pairs"] >= 1 and report["settings"]["train_on"] == "all", report["settings"]["no_pairs"]
    assert all(not isinstance(q, str) for q in questions)  # the prompts hold earlier turns


def test_a_sampled_answer_depends_on_its_question_and_seed_not_on_its_batch(preference_run):
    cfg = preference_run.read_config()
    tokenizer, columns = load_tokenizer(cfg), load_columns(preference_run, cfg)
    questions = generation_prompts(eval_rows(preference_run, "test"), 4)
    adapters = [BASE, "sft", "tuned"]

    def sampled(seed, rows, adapters=adapters, questions=questions):
        return generate_columns(columns.model, tokenizer, questions, adapters, 16, seed, rows, cfg.system_prompt,
                                modes=("sampled",), progress=False)["sampled"]

    together = sampled(0, 12)
    for adapter in adapters:  # each answer alone, one per batch, equals its answer in the mixed batch
        for q, question in enumerate(questions):
            alone = sampled(0, 1, [adapter], [question])[adapter][0]
            assert alone["answer"] == together[adapter][q]["answer"], (adapter, q)
    # Sampling draws: another seed changes answers, and they are not the greedy ones.
    other = sampled(1, 12)
    assert any(other[a][q]["answer"] != together[a][q]["answer"] for a in adapters for q in range(len(questions)))
    greedy = generate_columns(columns.model, tokenizer, questions, adapters, 16, 0, 12, cfg.system_prompt,
                              modes=("greedy",), progress=False)["greedy"]
    assert any(greedy[a][q]["answer"] != together[a][q]["answer"] for a in adapters for q in range(len(questions)))


def test_the_quantized_view_generates_mixed_batches_like_column_by_column(preference_run):
    """bitsandbytes' 4-bit layers take mixed adapters too (the tiny preset trains in NF4)."""
    import bitsandbytes as bnb

    cfg = preference_run.read_config()
    tokenizer, columns = load_tokenizer(cfg), load_columns(preference_run, cfg, quantized=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in columns.model.modules())
    questions = generation_prompts(eval_rows(preference_run, "test"), 3)
    t0 = time.perf_counter()
    ours = compare_generations(columns, tokenizer, questions, 16, 9, cfg.system_prompt, 0, progress=False)
    assert time.perf_counter() - t0 < 60
    want = reference_columns_greedy(columns, tokenizer, questions, 16, cfg.system_prompt)
    for name in columns.names:
        assert [g[name]["answer"] for g in ours["greedy"]] == [a["answer"] for a in want[name]], name


def test_evaluation_runs_sdpa_where_the_run_trained_with_eager_and_scores_the_same(preference_run):
    import dataclasses

    cfg = dataclasses.replace(preference_run.read_config(), attn_implementation="eager")
    rows, tokenizer = eval_rows(preference_run, "test"), load_tokenizer(cfg)
    columns = load_columns(preference_run, cfg)
    assert columns.model.config._attn_implementation == "sdpa"
    with columns.use("tuned") as model:
        sdpa = reference_score_model(model, tokenizer, cfg, rows)
        model.get_base_model().set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = reference_score_model(model, tokenizer, cfg, rows)
    assert_close(sdpa, eager)


# --- the decoding loop: each prompt prefilled once per adapter, ended rows dropped, generate's answers ---------

def test_decoding_prefills_each_prompt_once_drops_ended_rows_and_answers_as_generate(preference_run, monkeypatch):
    from fine_tune_llm.model import generation

    cfg = preference_run.read_config()
    tokenizer, columns = load_tokenizer(cfg), load_columns(preference_run, cfg)
    questions = generation_prompts(eval_rows(preference_run, "test"), 6)
    adapters = [BASE, "sft", "tuned"]
    fed = []
    spy = columns.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:  # 64 tokens: the tiny model's answers end anywhere from ~20 tokens to near the cap
        ours = generate_columns(columns.model, tokenizer, questions, adapters, 64, 0, 36, cfg.system_prompt,
                                progress=False)
    finally:
        spy.remove()
    # One batch: greedy then sampled rows of each adapter, the order generate_columns asks them in.
    lengths = [a["new_tokens"] for adapter in adapters for mode in ("greedy", "sampled") for a in ours[mode][adapter]]
    assert len(set(lengths)) > 5 and min(lengths) < 32 and max(lengths) > 48
    # The prefill ran the 6 x 3 distinct (prompt, adapter) once each, not the 36 rows.
    assert fed[0][0] == 18 and fed[0][1] > 1
    # Then each step fed the rows still answering: those whose answer is longer than the tokens so far.
    assert fed[1:] == [(sum(n > k for n in lengths), 1) for k in range(1, max(lengths))]
    want = reference_columns_greedy(columns, tokenizer, questions, 64, cfg.system_prompt)
    for adapter, name in zip(adapters, columns.names):
        assert [{k: a[k] for k in want[name][0]} for a in ours["greedy"][adapter]] == want[name], name
    # generate on the same batch, the same sampler: the same greedy and sampled answers.
    monkeypatch.setattr(generation, "generate_only", lambda gen: ["forced"])
    generated = generate_columns(columns.model, tokenizer, questions, adapters, 64, 0, 36, cfg.system_prompt,
                                 progress=False)
    for mode in ("greedy", "sampled"):
        for adapter in adapters:
            assert ([{**a, "seconds": 0} for a in ours[mode][adapter]]
                    == [{**a, "seconds": 0} for a in generated[mode][adapter]]), (mode, adapter)


def test_a_config_asking_for_a_repetition_penalty_is_answered_by_generate(preference_run, monkeypatch):
    from transformers import GenerationConfig

    from fine_tune_llm.model import generation
    from fine_tune_llm.model.decoding import generate_only

    assert generate_only(GenerationConfig(max_new_tokens=8, eos_token_id=[1, 5], top_k=5)) == []
    assert generate_only(GenerationConfig(repetition_penalty=1.3, min_new_tokens=2)) == ["repetition_penalty",
                                                                                         "min_new_tokens"]
    cfg = preference_run.read_config()
    tokenizer, columns = load_tokenizer(cfg), load_columns(preference_run, cfg)
    questions = generation_prompts(eval_rows(preference_run, "test"), 4)

    def greedy():
        out = generate_columns(columns.model, tokenizer, questions, [BASE, "sft", "tuned"], 32, 0, 12,
                               cfg.system_prompt, modes=("greedy",), progress=False)["greedy"]
        return {name: [a["answer"] for a in out[adapter]] for name, adapter in zip(columns.names, out)}

    plain = greedy()
    monkeypatch.setattr(columns.model.generation_config, "repetition_penalty", 1.3)
    monkeypatch.setattr(generation, "decode", lambda *a, **k: pytest.fail("decode would ignore the penalty"))
    penalized = greedy()
    want = reference_columns_greedy(columns, tokenizer, questions, 32, cfg.system_prompt)
    assert penalized == {name: [a["answer"] for a in want[name]] for name in columns.names}
    assert penalized != plain  # the penalty was applied


def test_generation_batches_keep_their_kv_cache_within_the_budget(monkeypatch, preference_run):
    from fine_tune_llm.model import generation
    from fine_tune_llm.model.decoding import kv_bytes_per_token
    from fine_tune_llm.model.generation import Ask, cache_bounded_batches

    monkeypatch.setattr(generation, "GENERATION_CACHE_BYTES", 1000)
    asks = [Ask(q, a, False) for a in "xy" for q in range(3)]
    widths = [100, 300, 100]  # prompt + answer tokens, by question; 1 byte a token below

    def cut(rows, widths=widths):
        return [[(a.question, a.adapter) for a in b] for b in cache_bounded_batches(asks, widths, rows, 1)]

    # 4 rows would hold 4 x 300 bytes: three do
    assert cut(4) == [[(0, "x"), (1, "x"), (2, "x")], [(0, "y"), (1, "y"), (2, "y")]]
    assert cut(2) == [[(0, "x"), (1, "x")], [(2, "x"), (0, "y")], [(1, "y"), (2, "y")]]
    # a prompt past the budget is a batch of its own
    assert cut(4, [2000, 10, 10]) == [[(0, "x")], [(1, "x"), (2, "x")], [(0, "y")], [(1, "y"), (2, "y")]]
    # The bytes a token takes are those the model's cache really holds.
    cfg = preference_run.read_config()
    model = load_columns(preference_run, cfg).model
    with torch.inference_mode():
        cache = model(input_ids=torch.ones((1, 10), dtype=torch.long), use_cache=True).cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes_per_token(model) == held / 10
