"""The preference stage (DPO after SFT) on the tiny preset: it learns, its reference is the SFT model, it never
sees a test question, it resumes exactly, and it refuses bad pairs and a changed SFT adapter."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from cli_runs import adapter, start, wait_for

from fine_tune_llm.data import rows as data
from fine_tune_llm.data.clusters import normalize_question
from fine_tune_llm.errors import ConfigError, DataError
from fine_tune_llm.run import RunDir
from fine_tune_llm.train import checkpoints
from fine_tune_llm.train.lineage import preference_config
from tests.conftest import train_tiny


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    copy = root / "pairs.jsonl"
    shutil.copyfile(data.SAMPLE_DATA, copy)
    _cfg, result = train_tiny(root, "sft", dataset=str(copy), max_steps=10, eval_steps=10, save_steps=10)
    return result.run


@pytest.fixture(scope="module")
def dpo(sft):
    from fine_tune_llm.train.preference import train_preference

    # A rate far above the preset's moves the toy a long way in 8 steps: these tests check the mechanism (loss,
    # margins, lineage), not what the preset's stage does to the toy's answers (test_notebooks.py looks at that).
    # group_by_length as the CPU preset runs it: length-grouped training batches, evaluation sorted by length
    cfg = preference_config(sft.path, loss_type="sigmoid", learning_rate=5e-3, max_steps=8, logging_steps=1,
                            eval_steps=8, save_steps=8, group_by_length=True)
    return cfg, train_preference(cfg, resume=False)


def test_dpo_lowers_its_loss_and_raises_the_held_out_reward_margin(dpo):
    cfg, result = dpo
    train = [h for h in result.log_history if "loss" in h]
    evals = [h for h in result.log_history if "eval_rewards/margins" in h]
    # Step 1 is scored before any update: the policy is the reference, so DPO's loss is exactly log 2 and the
    # margin 0. That is the held-out margin's starting point too.
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and train[0]["rewards/margins"] == pytest.approx(0, abs=1e-3)
    assert sum(h["loss"] for h in train[-3:]) / 3 < 0.5 * train[0]["loss"]
    assert evals[-1]["eval_rewards/margins"] > 0.5 and evals[-1]["eval_rewards/accuracies"] > 0.5
    assert cfg.stage == "dpo" and cfg.warmup_ratio == 0.0  # the tiny preset's preference defaults


def _ref_setup(sft, name: str, **overrides):
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.train.lineage import record_parent
    from fine_tune_llm.train.preference import load_policy, prepare_pairs

    cfg = preference_config(sft.path, output_dir=str(sft.path) + f"-{name}", max_steps=1, **overrides)
    run = RunDir.of(cfg.output_dir)
    record_parent(run, sft)
    tok = load_tokenizer(cfg)
    return cfg, run, tok, prepare_pairs(cfg, run, tok), load_policy(cfg, sft)


def test_reference_log_probs_are_the_sft_models_own(sft):
    """The reference pass scores the SFT adapter as loaded: its log-probs equal the SFT model's log-probs of the
    same answers, scored independently by the evaluation's scorer (other batches, other padding)."""
    from fine_tune_llm.eval.scoring import score_tokens
    from fine_tune_llm.train.preference import reference_columns

    cfg, run, tok, data, policy = _ref_setup(sft, "ref-check")
    pairs = reference_columns(cfg, run, policy, tok, data)["validation"]
    policy.eval()
    for answer in ("chosen", "rejected"):
        ids = [p + a for p, a in zip(pairs["prompt_ids"], pairs[f"{answer}_ids"])]
        masks = [[0] * len(p) + [1] * len(a) for p, a in zip(pairs["prompt_ids"], pairs[f"{answer}_ids"])]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nats, _ = score_tokens(policy, ids, masks, pad_id=tok.pad_token_id, progress=False)
        ours = torch.tensor([-n for n in nats])
        theirs = torch.tensor(pairs[f"ref_{answer}_logps"])
        # bf16 compute on both sides, batched differently: a few hundredths of a nat on sums of ~100 tokens
        assert torch.allclose(theirs, ours, rtol=1e-2, atol=0.1), (theirs - ours).abs().max()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_pair_packed_on_one_shared_prompt_scores_as_its_two_sequences_apart(sft, attention):
    """The reference pass runs each prompt once (prompt + chosen + rejected in one row, the rejected answer masked
    from the chosen one, its positions restarted): in float32 its log-probs equal scoring the two sequences apart."""
    from fine_tune_llm.train.preference_logps import packed_pair_logps, sequence_logps

    _cfg, _run, tok, data, policy = _ref_setup(sft, f"packed-{attention}", dtype="float32")
    policy.config._attn_implementation = attention
    pairs = data["train"]
    prompts, chosen, rejected = list(pairs["prompt_ids"]), list(pairs["chosen_ids"]), list(pairs["rejected_ids"])
    policy.eval()
    widths = []
    forward = policy.forward
    policy.forward = lambda *a, **k: widths.append(k["input_ids"].shape[1]) or forward(*a, **k)
    # Widths rounded up to a multiple of 16 (training's pad_to_multiple_of): a bounded set of shapes, same numbers.
    packed = packed_pair_logps(policy, prompts, chosen, rejected, tok.pad_token_id, batch_tokens=1500, progress=False,
                               pad_to=16)
    assert widths and all(w % 16 == 0 for w in widths)
    widths.clear()
    apart = sequence_logps(policy, [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)],
                           [len(p) for p in prompts] * 2, tok.pad_token_id, progress=False)
    n = len(prompts)
    assert n > 8 and len({len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)}) > 3
    assert any(w % 16 for w in widths)  # unrounded, the widths are of every kind
    torch.testing.assert_close(torch.tensor(packed["chosen"]), torch.tensor(apart[:n]), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(torch.tensor(packed["rejected"]), torch.tensor(apart[n:]), rtol=1e-5, atol=1e-3)


def test_a_second_start_reads_the_reference_pass_back_and_a_changed_reference_recomputes_it(sft, monkeypatch):
    from fine_tune_llm.train import preference, preference_logps

    cfg, run, tok, data, policy = _ref_setup(sft, "ref-cache")
    first = preference.reference_columns(cfg, run, policy, tok, data)
    saved = json.loads(run.reference_logps_file.read_text())
    assert set(saved["splits"]) == {"train", "validation"} and len(saved["splits"]["train"]["chosen"]) == len(
        data["train"])
    calls = []
    real = preference_logps.pair_logps
    monkeypatch.setattr(preference, "pair_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = preference.reference_columns(cfg, run, policy, tok, data)
    assert calls == [] and again["train"]["ref_chosen_logps"] == first["train"]["ref_chosen_logps"]
    fewer = {"train": data["train"].select(range(3)), "validation": data["validation"]}  # other pairs: recomputed
    assert len(preference.reference_columns(cfg, run, policy, tok, fewer)["train"]) == 3 and len(calls) == 2


def test_the_answer_only_head_gives_trls_loss_and_gradients_on_a_fixed_batch(sft):
    """TRL's fused head scores every position; ours only the answers. In float32 the loss, every logged metric
    TRL reads from the head and the LoRA gradients agree to float rounding (1e-5 of each gradient's norm)."""
    from fine_tune_llm.model.loading import restore_trainable_dtype
    from fine_tune_llm.train.preference import dpo_config, reference_columns
    from fine_tune_llm.train.preference_logps import install_answer_only_head
    from fine_tune_llm.train.trainers import GuardedDPOTrainer

    cfg, run, tok, data, policy = _ref_setup(sft, "head-check", dtype="float32")
    pairs = reference_columns(cfg, run, policy, tok, data)["train"]
    args = dpo_config(cfg, run)
    args.eval_strategy = "no"
    trainer = GuardedDPOTrainer(model=policy, ref_model=None, args=args, train_dataset=pairs.select_columns(
        ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]), processing_class=tok)
    restore_trainable_dtype(trainer.model, cfg)  # as the stage does: TRL casts the adapter to bf16
    batch = trainer.data_collator([pairs[i] for i in range(6)])
    trainable = [p for p in policy.parameters() if p.requires_grad]

    def loss_and_grads():
        policy.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(policy, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainable], {k: v[-1] for k, v in trainer._metrics["train"].items()}

    policy.train()
    with torch.random.fork_rng():  # same step twice: nothing random (dropout 0), but keep the RNG untouched
        trl_loss, trl_grads, trl_logged = loss_and_grads()
        install_answer_only_head(policy.get_base_model())
        loss, grads, logged = loss_and_grads()
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    for ours, theirs in zip(grads, trl_grads):  # relative to each gradient's norm: float32 summation order only
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "mean_token_accuracy"):
        assert logged[key] == pytest.approx(trl_logged[key], rel=1e-4, abs=1e-5), key


def test_the_preference_stage_never_trains_on_a_test_question(sft, dpo):
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.train.preference import prepare_pairs

    cfg, result = dpo
    saved = sft.load_splits()
    pairs = prepare_pairs(cfg, result.run, load_tokenizer(cfg))
    trained_rows = set(pairs["train"]["row"]) | set(pairs["validation"]["row"])
    test_rows = {r["row"] for r in saved["test"]}
    assert trained_rows and not trained_rows & test_rows
    assert set(pairs["train"]["row"]) <= {r["row"] for r in saved["train"]}
    test_questions = {normalize_question(r["question"]) for r in saved["test"]}
    by_row = {r["row"]: r for r in saved["train"]}
    assert not {normalize_question(by_row[n]["question"]) for n in pairs["train"]["row"]} & test_questions
    assert json.loads(result.run.splits_file.read_text()) == json.loads(sft.splits_file.read_text())


def test_the_run_records_its_sft_run_and_refuses_a_changed_sft_adapter(sft, dpo, tmp_path):
    from fine_tune_llm.train.lineage import parent_of

    _cfg, result = dpo
    record = json.loads(result.run.parent_file.read_text())
    assert record["sft_run"] == str(sft.path.resolve()) and len(record["adapter_sha256"]) == 64
    assert parent_of(result.run) == RunDir.of(sft.path.resolve())
    copy = RunDir.of(tmp_path / "sft")
    shutil.copytree(sft.path, copy.path)
    shutil.copytree(result.run.path, tmp_path / "dpo")
    moved = json.loads((tmp_path / "dpo" / "sft_run.json").read_text())
    (tmp_path / "dpo" / "sft_run.json").write_text(json.dumps({**moved, "sft_run": str(copy.path)}))
    weights = copy.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the SFT adapter retrained or edited
    with pytest.raises(ConfigError, match="has a different adapter now"):
        parent_of(RunDir.of(tmp_path / "dpo"))


def test_pairs_without_a_usable_rejected_answer_are_refused_naming_file_row_and_column(tmp_path):
    rows = [{"row": 7, "question": "q", "answer": "a kind answer", "rejected": "a kind answer "}]
    with pytest.raises(DataError, match=r"f.jsonl: row 7, column 'response_k': the rejected answer is identical"):
        data.check_pairs(rows, "f.jsonl")
    with pytest.raises(DataError, match=r"f.jsonl: row 3, column 'response_k': the rejected answer is empty"):
        data.check_pairs([{"row": 3, "question": "q", "answer": "a", "rejected": " \t"}], "f.jsonl")
    with pytest.raises(DataError, match="the preference stage needs pairs"):
        data.check_pairs([{"row": 1, "question": "q", "answer": "a", "rejected": None}], "f.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "response_j": "a", "response_k": "  "}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1, column 'response_k': text is empty"):
        data.load_examples(str(path))  # an empty rejected answer stops any stage when the file is read


def test_preference_stage_keeps_the_sft_runs_model_and_data(sft, dpo):
    with pytest.raises(ConfigError, match="keeps its lora_r"):
        preference_config(sft.path, lora_r=32)
    with pytest.raises(ConfigError, match="--sft-run takes the SFT run"):
        preference_config(dpo[1].run.path)  # a dpo run is not an SFT run


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(sft, tmp_path):
    def args(name):
        return ["--stage", "dpo", "--sft-run", str(sft.path), "--max-steps", "6", "--save-steps", "2",
                "--logging-steps", "1", "--eval-steps", "100", "--output-dir", str(tmp_path / name),
                "--metrics-dir", str(tmp_path / "metrics"), "--imgs-dir", str(tmp_path / "imgs")]

    ref = start(args("ref"), tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    victim = start(args("crash"), tmp_path / "crash.log")
    wait_for(tmp_path / "crash" / "checkpoint-4" / checkpoints.MARKER, victim)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    resumed = start(args("crash"), tmp_path / "resume.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resume.log").read_text()
    a, b = adapter(tmp_path / "ref" / "adapter"), adapter(tmp_path / "crash" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluating_a_dpo_run_compares_base_sft_and_sft_dpo_and_the_card_names_both_stages(sft, dpo, tmp_path):
    from fine_tune_llm.eval.evaluate import evaluate_run
    from fine_tune_llm.release import release_adapter

    _cfg, result = dpo
    report = evaluate_run(result.run, n_generations=2, max_new_tokens=24, metrics_dir=tmp_path, progress=False)
    assert report["columns"] == {"base": "base", "sft": "SFT", "tuned": "SFT+DPO"}
    m = report["metrics"]
    assert m["base"]["answer_tokens"] == m["sft"]["answer_tokens"] == m["tuned"]["answer_tokens"]
    # DPO pushed the chosen answers up relative to the rejected ones, beyond what SFT did
    assert m["tuned"]["mean_margin"] > m["sft"]["mean_margin"]
    assert report["deltas_vs_sft"]["mean_margin"] == pytest.approx(m["tuned"]["mean_margin"] - m["sft"]["mean_margin"])
    assert set(report["generation_lengths"]) == {"base", "sft", "tuned"}
    assert report["settings"]["weights"].startswith("base weights as released (unquantized)")
    text = result.run.report_md.read_text()
    assert "| metric | base | SFT | SFT+DPO |" in text and "mean generated tokens" in text
    card = (release_adapter(result.run, tmp_path / "release", dataset_id="jkhedri/psychology-dataset")
            / "README.md").read_text()
    assert "TRL's DPOTrainer (loss `sigmoid`, beta 0.1" in card and "| metric | base | SFT | SFT+DPO |" in card


def test_the_preference_goal_check_names_what_failed():
    from benchmarks.preference_goal import goal

    sft = {"margin_ci95": [0.10, 0.20], "perplexity": 3.0}
    assert goal(sft, {"margin_ci95": [0.25, 0.40], "perplexity": 3.2}, 60, 66) == (True, "met")
    met, why = goal(sft, {"margin_ci95": [0.15, 0.40], "perplexity": 3.5}, 60, 80)
    assert not met and "not above SFT's" in why and "perplexity 3.500 > 1.10 x" in why and "length 80.0" in why


def test_simpo_is_dpo_trainers_normalized_loss_with_constant_offsets(sft, tmp_path):
    """loss_type simpo: the first step's loss (one batch of every training pair, before any update) equals SimPO's
    -log sigmoid(beta/|c| log p(c) - beta/|r| log p(r) - gamma), computed here from the SFT model's log-probs."""
    from fine_tune_llm.eval.scoring import score_tokens
    from fine_tune_llm.model.loading import load_tokenizer
    from fine_tune_llm.train.preference import load_policy, prepare_pairs, train_preference

    cfg = preference_config(sft.path, loss_type="simpo", beta=2.0, simpo_gamma=1.0, max_steps=1, batch_size=256,
                            output_dir=str(tmp_path / "simpo"), eval_steps=100, save_steps=100)
    result = train_preference(cfg, resume=False)
    logged = next(h["loss"] for h in result.log_history if "loss" in h)
    pairs = prepare_pairs(cfg, result.run, load_tokenizer(cfg))["train"]
    policy = load_policy(cfg, sft).eval()
    per_token = {}
    for answer in ("chosen", "rejected"):
        ids = [p + a for p, a in zip(pairs["prompt_ids"], pairs[f"{answer}_ids"])]
        masks = [[0] * len(p) + [1] * len(a) for p, a in zip(pairs["prompt_ids"], pairs[f"{answer}_ids"])]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nats, tokens = score_tokens(policy, ids, masks, pad_id=0, progress=False)
        per_token[answer] = -torch.tensor(nats) / torch.tensor(tokens, dtype=torch.float32)
    want = -torch.nn.functional.logsigmoid(2.0 * (per_token["chosen"] - per_token["rejected"]) - 1.0).mean().item()
    assert logged == pytest.approx(want, rel=0.02)  # bf16 compute on both sides
    assert "ref_rejected_logps" in pairs.column_names and pairs["ref_chosen_logps"][0] == 0.0
