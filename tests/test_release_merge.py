"""Release stage 2: merging into bf16 or dequantized NF4 weights, the parity check, and the 4-bit refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fine_tune_llm.cli import main
from fine_tune_llm.release.merge import (
    check_merged,
    measure_4bit_merge,
    merge_adapter,
    safetensors_facts,
    stochastic_round_bf16,
)
from fine_tune_llm.release.parity import EFFECT_RTOL, LOGIT_ATOL, LOSS_ATOL
from tests.conftest import train_tiny

# Two held-out prompts and eight validation answers: enough positions (~100) and answer tokens (~500) to
# compare, few enough forward passes for 2 CPU cores.
PROBE = {"n_prompts": 2, "n_eval": 8}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cfg, _ = train_tiny(tmp_path_factory.mktemp("release-merge"), max_steps=8, logging_steps=4, eval_steps=8,
                        save_steps=8)
    return Path(cfg.output_dir)


@pytest.fixture(scope="module")
def bf16(run_dir):
    return merge_adapter(run_dir, mode="bf16", **PROBE)  # default place: RUN/release/merged


@pytest.fixture(scope="module")
def nf4(run_dir, tmp_path_factory):
    return merge_adapter(run_dir, tmp_path_factory.mktemp("nf4") / "merged", mode="nf4", **PROBE)


def test_bf16_merge_matches_base_plus_adapter_and_is_bf16_sized(bf16, run_dir):
    p = bf16.parity
    assert bf16.folder == run_dir / "release" / "merged"
    assert p.passed and p.max_abs_logit_diff <= LOGIT_ATOL and abs(p.loss_diff) <= LOSS_ATOL
    assert p.top1_agreement >= 0.99
    # The comparison is not vacuous: the adapter moved the logits far more than the merge error.
    assert p.adapter_effect_mean_abs > 20 * p.mean_abs_logit_diff
    facts = safetensors_facts(bf16.folder)
    assert facts["dtypes"] == {"BF16": facts["dtypes"]["BF16"]}
    assert bf16.parameters == 606_976 == facts["numel"]  # tied embeddings saved once
    assert facts["data_bytes"] == 2 * bf16.parameters
    assert facts["file_bytes"] - facts["data_bytes"] < 4096  # the rest is the safetensors header
    config = json.loads((bf16.folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert check_merged(bf16.folder).ok


def test_merged_folder_loads_standalone_and_its_card_carries_the_parity_numbers(bf16):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bf16.folder)
    assert model.dtype == torch.bfloat16 and not hasattr(model, "peft_config")
    tok = AutoTokenizer.from_pretrained(bf16.folder)
    assert (bf16.folder / "tokenizer.model").is_file()
    gen = json.loads((bf16.folder / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<eos>", "<end_of_turn>"]
    card = ModelCard.load(bf16.folder / "README.md", ignore_metadata_errors=False)
    assert card.data.library_name == "transformers" and card.data.base_model == "tiny-gemma"
    p = bf16.parity
    assert f"| max abs logit difference | {p.max_abs_logit_diff:.4g} | {LOGIT_ATOL} |" in card.text
    assert f"{p.reference_loss:.5f} -> {p.merged_loss:.5f}" in card.text
    assert "Result: passed" in card.text and "## Safety" in card.text
    recorded = json.loads((bf16.folder / "parity.json").read_text())
    assert recorded["passed"] is True and recorded["max_abs_logit_diff"] == p.max_abs_logit_diff


def test_nf4_merge_reproduces_the_4bit_model_training_used_better_than_the_bf16_merge(nf4, bf16):
    assert nf4.parity.passed and nf4.parity.max_abs_logit_diff <= LOGIT_ATOL
    assert check_merged(nf4.folder).ok
    # nf4's reference is the 4-bit base + adapter as trained; the bf16 merge starts from other base weights.
    training_model_loss = nf4.parity.reference_loss
    assert abs(nf4.parity.merged_loss - training_model_loss) < abs(bf16.parity.merged_loss - training_model_loss)
    from safetensors.torch import load_file

    a = load_file(str(nf4.folder / "model.safetensors"))
    b = load_file(str(bf16.folder / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # dequantized NF4 weights, not the bf16 release
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # never quantized


def test_merging_into_the_4bit_weights_is_refused_with_the_measured_damage(run_dir, bf16, capsys):
    damage = measure_4bit_merge(run_dir, **PROBE)
    assert not damage.passed
    # Re-quantizing W + BA to NF4 loses far more of the adapter than rounding the merge to bf16 does.
    assert damage.effect_ratio > EFFECT_RTOL > bf16.parity.effect_ratio
    assert damage.mean_abs_logit_diff > 10 * bf16.parity.mean_abs_logit_diff
    assert main(["release", "merge", str(run_dir), "--mode", "4bit", "--prompts", "2", "--eval-rows", "8"]) == 2
    err = capsys.readouterr().err
    assert "refusing to merge into the 4-bit weights" in err and f"{damage.max_abs_logit_diff:.4g}" in err


def test_check_refuses_a_float32_checkpoint_twice_the_size(bf16, tmp_path):
    from safetensors.torch import load_file, save_file

    fat = tmp_path / "fat"
    shutil.copytree(bf16.folder, fat)
    weights = load_file(str(fat / "model.safetensors"))
    save_file({k: v.float() for k, v in weights.items()}, str(fat / "model.safetensors"), metadata={"format": "pt"})
    errors = check_merged(fat).errors
    assert any("must all be bf16" in e and "F32" in e for e in errors), errors
    assert any("bf16 needs" in e for e in errors), errors


def test_check_refuses_a_merge_whose_parity_failed_or_was_never_run(bf16, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(bf16.folder, folder)
    parity = json.loads((folder / "parity.json").read_text())
    (folder / "parity.json").write_text(json.dumps({**parity, "passed": False}))
    assert any("parity check failed" in e for e in check_merged(folder).errors)
    (folder / "parity.json").unlink()
    assert any("parity.json is missing" in e for e in check_merged(folder).errors)


def test_stochastic_rounding_to_bf16_keeps_small_updates_in_expectation():
    """A LoRA update below half a bf16 step vanishes under round-to-nearest; stochastic rounding keeps its mean."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.full((100_000,), 0.75)  # on the bf16 grid, like a released bf16 weight; step there: 2^-8
    update = 4e-4  # a tenth of that step
    assert torch.equal((weight + update).to(torch.bfloat16).float(), weight)  # nearest: the update is gone
    rounded = stochastic_round_bf16(weight + update, gen).float()
    assert set(rounded.unique().tolist()) == {0.75, 0.75 + 2**-8}
    assert abs((rounded - weight).mean().item() - update) < 0.05 * update
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_bf16(exact, gen).float(), exact)  # bf16 values stay put
    negative = stochastic_round_bf16(torch.full((100_000,), -0.75 - update), gen).float()
    assert abs(negative.mean().item() + 0.75 + update) < 0.05 * update
