"""benchmarks/gpu_check.sh, the GPU check of issue #14: its CPU-side logic (CI has no GPU)."""

from __future__ import annotations

import csv
import inspect
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check


class FakeGemmaTokenizer:
    """What gemma_config reads from gemma-2b-it's tokenizer: its size and special ids."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __len__(self):
        return 256000


def test_the_model_has_gemma_2b_its_published_shape():
    from transformers import GemmaForCausalLM

    config = gpu_check.gemma_config(FakeGemmaTokenizer(), gpu_check.GEMMA_2B_IT_SHAPE)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (2048, 18, 8, 1, 256, 16384, 256000)
    assert config.tie_word_embeddings and config.hidden_act == "gelu_pytorch_tanh"
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 2_506_172_416  # gemma-2b's 2.51B parameters


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="256000 tokens"):
        gpu_check.gemma_config(FakeGemmaTokenizer(), {**gpu_check.GEMMA_2B_IT_SHAPE, "vocab_size": 1000})


def test_arguments():
    a = gpu_check.parse_args([])
    assert (a.rows, a.skip, a.steps, a.warmup, a.batch, a.quick) == (["naive", "trl-default", "ours"], set(), 6, 2, 4,
                                                                       False)
    a = gpu_check.parse_args(["--rows", "ours", "--skip", "fsdp,ddp", "--quick"])
    assert (a.rows, a.skip, a.quick) == (["ours"], {"fsdp", "ddp"}, True)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--rows", "ours,fastest"])


def test_csv_has_every_rows_columns(tmp_path):
    rows = [{"row": "naive", "trained_tok_s": 10.5}, {"row": "ours", "trained_tok_s": 42.0, "est_peak_gb": 8.1}]
    path = gpu_check.write_rows(tmp_path / "m" / "bench.csv", rows, {"device": "H200"})
    read = list(csv.DictReader(path.open()))
    assert list(read[0]) == ["row", "trained_tok_s", "est_peak_gb", "device"]
    assert read == [{"row": "naive", "trained_tok_s": "10.5", "est_peak_gb": "", "device": "H200"},
                    {"row": "ours", "trained_tok_s": "42.0", "est_peak_gb": "8.1", "device": "H200"}]


def test_gradient_comparison():
    want = {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 2.0])}
    assert gpu_check.compare_grads(want, want) == {"max_rel_err": 0.0, "min_cosine": pytest.approx(1.0), "tensors": 2}
    got = {"a": torch.tensor([1.0, 0.1, 0.0]), "b": torch.tensor([0.0, 2.0])}
    stats = gpu_check.compare_grads(got, want)
    assert stats["max_rel_err"] == pytest.approx(0.1) and stats["min_cosine"] == pytest.approx(1 / 1.01**0.5)


def test_4bit_lora_gradients_match_the_dequantized_reference_on_cpu(tmp_path):
    """The grads check itself, on the tiny 4-bit model: same LoRA, 4-bit layers vs their dequantized weights."""
    from fine_tune_llm.model.loading import add_lora, load_model, load_tokenizer

    cfg = tiny_config(tmp_path, dtype="bfloat16")
    model = add_lora(load_model(cfg), cfg)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn_like(p, dtype=torch.float32).mul(0.02).to(p.dtype)
    tok = load_tokenizer(cfg)
    ids = tok("How do I stop worrying about everything?", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    got = gpu_check.lora_grads(model, batch)
    assert all(float(g.abs().sum()) > 0 for g in got.values())  # A's gradients too: B was set non-zero
    assert gpu_check.dequantize_base_layers(model) == 2 * 7
    stats = gpu_check.compare_grads(got, gpu_check.lora_grads(model, batch))
    assert stats["tensors"] == 2 * 7 * 2 and stats["max_rel_err"] < 0.05 and stats["min_cosine"] > 0.998


def test_the_train_throughput_functions_it_reuses_still_fit():
    """gpu_check drives benchmarks/train_throughput.py's rows: fail here, not on the day a GPU is there."""
    import train_throughput as tt

    assert set(gpu_check.ROWS) <= set(tt.ROWS)
    assert list(inspect.signature(tt.run_row).parameters) == ["name", "a", "ctx"]
    assert list(inspect.signature(tt.bench_data).parameters)[:5] == ["tokenizer", "n_train", "n_eval", "max_length",
                                                                     "seed"]
    for name in ("load_tokenizer", "eval_batches", "lora_flops_per_token", "answer_share", "matmul_peak", "LORA"):
        assert hasattr(tt, name), name
    a = gpu_check.parse_args([])
    assert all(hasattr(a, k) for k in ("lr", "steps", "seed", "batch", "naive_micro_batch", "max_length", "warmup"))


@pytest.mark.parametrize("command", [["benchmarks/gpu_check.sh"], [sys.executable, "benchmarks/gpu_check.py"]])
def test_without_cuda_it_exits_with_a_clear_message(command):
    assert os.access(REPO / "benchmarks" / "gpu_check.sh", os.X_OK)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "gpu_check needs a CUDA GPU: CUDA_VISIBLE_DEVICES='' hides every GPU"
    assert "wrote" not in proc.stdout  # no CSV from a run that measured nothing


def test_the_preference_check_measures_steps_the_reference_pass_and_memory(tmp_path, monkeypatch):
    """The DPO check, run on the tiny preset with the CUDA memory counters stubbed: the rows the first lent GPU
    writes to bench_preference_cuda.csv."""
    from fine_tune_llm.config import make_config

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    ctx = {"cfg": lambda **kw: make_config("tiny", **kw)}
    result = gpu_check.check_preference(ctx)
    rows = {r["row"]: r for r in ctx["preference_rows"]}
    assert result["ok"] and set(rows) == {"sft_step", "dpo_step", "ref_pass"}
    assert rows["dpo_step"]["seconds"] > 0 and rows["dpo_step"]["peak_mem_gb"] == 1.0 and rows["ref_pass"]["pairs"] > 0
    assert "dpo_step / sft_step" in result["detail"]
