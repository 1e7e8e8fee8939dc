"""The fast training paths give the plain paths' numbers.

- padding-free packing: examples concatenated in one row attend only within themselves (the block-diagonal
  mask transformers derives from TRL's position_ids), with eager and SDPA attention;
- the same loss, gradients and masked labels packed as padded, through TRL's loss and ours;
- the answer-only loss (logits only where a label is trained on, chunked fp32 cross-entropy) equals TRL's;
- frozen weights kept in bf16 are exactly the loaded ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fine_tune_llm.config import make_config
from fine_tune_llm.model.loading import add_lora, load_model, load_tokenizer
from fine_tune_llm.train.answer_loss import ChunkedCrossEntropy, answer_positions
from fine_tune_llm.train.sft import build_trainer, prepare_data

# Tolerances: fp32 runs the same math in another order (measured: loss 1e-7, gradients 1e-6 relative); bf16
# 4-bit, the real path, rounds each matmul to 8 bits (measured: same loss, gradients within 1.1% of the largest).
TOL = {"float32": {"rtol": 1e-6, "atol": 1e-6}, "bfloat16": {"rtol": 1e-3, "atol": 1e-3}}
GRAD_TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def collate(rows, pad_token_id: int, padding_free: bool):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=padding_free)(rows)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(make_config("tiny"))


@pytest.fixture(scope="module")
def rows(tok):
    """Four real sample rows, tokenized by the training path, with TRL-style labels (-100 off the answer)."""
    cfg = make_config("tiny", data_samples=12)
    _, data = prepare_data(cfg, tok)
    train = data["train"]
    return [{"input_ids": train[i]["input_ids"],
             "labels": [t if m else -100 for t, m in zip(train[i]["input_ids"], train[i]["completion_mask"])]}
            for i in range(4)]


@pytest.fixture(scope="module")
def fp32_models():
    """The tiny Gemma in fp32 (no quantization), once per attention implementation."""
    return {impl: load_model(make_config("tiny", quantization="none", dtype="float32", attn_implementation=impl),
                             quantize=False, dtype=torch.float32).eval() for impl in ("eager", "sdpa")}


# --- no cross-example attention in a packed row -----------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_an_example_packed_after_another_gets_the_logits_it_gets_alone(fp32_models, rows, tok, impl):
    model = fp32_models[impl]
    a, b = rows[0], rows[1]
    packed = collate([b, a], tok.pad_token_id, padding_free=True)
    assert "attention_mask" not in packed  # padding-free: the mask comes from position_ids alone
    # use_cache=False as in training (TRL's compute_loss and ours set it): transformers looks for packed rows
    # only when there is no KV cache, so a forward that builds one attends across the whole row.
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a["input_ids"]]), use_cache=False).logits[0]
        together = model(**model_inputs(packed), use_cache=False).logits[0]
        with_cache = model(**model_inputs(packed), use_cache=True).logits[0]
        # Teeth: the same tokens as one plain causal sequence (positions run on) do see the first example.
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    n_b = len(b["input_ids"])
    torch.testing.assert_close(together[n_b:], alone, rtol=1e-4, atol=1e-5)
    b_alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(together[:n_b], b_alone, rtol=1e-4, atol=1e-5)
    assert (leaky[n_b:] - alone).abs().max() > 1e-2  # the check above would catch leakage
    assert (with_cache[n_b:] - alone).abs().max() > 1e-2  # why use_cache=False matters


def test_transformers_reads_the_packed_rows_from_position_ids(rows, tok):
    """The mechanism the test above relies on: masking_utils turns TRL's position_ids into sequence ids."""
    from transformers.masking_utils import find_packed_sequence_indices

    packed = collate(rows[:3], tok.pad_token_id, padding_free=True)
    seq = find_packed_sequence_indices(packed["position_ids"])[0]
    lengths = [len(r["input_ids"]) for r in rows[:3]]
    assert seq.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]


# --- the same labels, loss and gradients, packed or padded, TRL's loss or ours ----------------------------

def test_masked_labels_are_identical_packed_and_padded(rows, tok):
    packed = collate(rows, tok.pad_token_id, padding_free=True)["labels"][0]
    padded = collate(rows, tok.pad_token_id, padding_free=False)["labels"]
    start = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert packed[start:start + n].tolist() == r["labels"] == padded[i, :n].tolist()
        assert (padded[i, n:] == -100).all()
        assert r["labels"][0] == -100  # each example starts with its prompt: no target crosses a boundary
        start += n
    # The trained targets, in the order the answer-only loss sees them, are the same in both layouts.
    assert torch.equal(answer_positions(packed[None])[1], answer_positions(padded)[1])
    n_answer = sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    assert answer_positions(padded)[1].numel() == n_answer > 0


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def trainer(request, tok, tmp_path_factory):
    """The project's trainer (answer-only loss mixed into TRL's SFTTrainer) on the tiny model: fp32 without
    quantization for tight checks, and the real path (4-bit NF4, bf16)."""
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"packing-{dtype}")
    extra = {"quantization": "none", "dtype": "float32"} if dtype == "float32" else {}
    cfg = make_config("tiny", output_dir=str(tmp / "run"), metrics_dir=str(tmp / "m"), imgs_dir=str(tmp / "i"),
                      data_samples=12, loss_impl="answer-logits", **extra)
    _, data = prepare_data(cfg, tok)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg, quantize=cfg.quantization != "none"), cfg)
    with torch.no_grad():  # non-zero B: every LoRA matrix gets a gradient, and the adapter changes the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    t = build_trainer(cfg, model, tok, data["train"], data["validation"], tmp / "run")
    t.precision = dtype
    return t


def loss_and_grads(trainer, compute_loss, batch, num_items=None):
    from trl import SFTTrainer

    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    fn = SFTTrainer.compute_loss if compute_loss == "trl" else type(trainer).compute_loss
    with trainer.accelerator.autocast():
        loss = fn(trainer, model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def test_loss_and_gradients_agree_packed_padded_trl_and_ours(trainer, rows, tok):
    tol = TOL[trainer.precision]
    batches = {"packed": collate(rows, tok.pad_token_id, padding_free=True),
               "padded": collate(rows, tok.pad_token_id, padding_free=False)}
    n_items = torch.tensor(answer_positions(batches["padded"]["labels"])[1].numel())
    ref_loss, ref_grads = loss_and_grads(trainer, "trl", batches["padded"], n_items)
    assert 0 < ref_loss < 20 and len(ref_grads) == 2 * 7 * 2
    for layout in ("padded", "packed"):
        for impl in ("trl", "ours"):
            loss, grads = loss_and_grads(trainer, impl, batches[layout], n_items)
            torch.testing.assert_close(loss, ref_loss, **tol, msg=f"{layout}/{impl} loss")
            for name, g in grads.items():
                scale = ref_grads[name].abs().max()
                assert scale > 0, name
                err = (g - ref_grads[name]).abs().max() / scale
                assert err < GRAD_TOL[trainer.precision], f"{layout}/{impl} {name}: gradient error {err:.2e}"


def test_answer_only_loss_without_num_items_is_the_mean_over_answer_tokens(trainer, rows, tok):
    """Evaluation calls compute_loss without num_items_in_batch: the loss is then the per-token mean, as TRL's."""
    batch = collate(rows, tok.pad_token_id, padding_free=True)
    ours, _ = loss_and_grads(trainer, "ours", batch)
    ours_accuracy = trainer._metrics["train"]["mean_token_accuracy"][-1]
    trl, _ = loss_and_grads(trainer, "trl", batch)
    torch.testing.assert_close(ours, trl, **TOL[trainer.precision])
    # The token accuracy both log (ours from the cross-entropy pass, TRL's from its own head) agrees.
    assert ours_accuracy == pytest.approx(trainer._metrics["train"]["mean_token_accuracy"][-1], abs=0.02)
    assert 0 < ours_accuracy < 1


def test_the_project_trainer_uses_the_answer_only_loss_on_cpu(trainer):
    from fine_tune_llm.train.answer_loss import AnswerOnlyLossMixin, wanted

    assert isinstance(trainer, AnswerOnlyLossMixin)
    if not torch.cuda.is_available():
        assert wanted("auto")
    assert not wanted("trl") and wanted("answer-logits")


# --- the chunked cross-entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch_across_chunks(monkeypatch, dtype):
    from fine_tune_llm.train import answer_loss as fast_loss

    monkeypatch.setattr(fast_loss, "CE_CHUNK_ELEMENTS", 3 * 1000)  # 3 rows per chunk: 11 rows = 4 chunks
    torch.manual_seed(0)
    logits = (torch.randn(11, 1000) * 3).to(dtype)
    targets = torch.randint(1000, (11,))
    weights = torch.rand(11)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours, top1, _, _ = ChunkedCrossEntropy.apply(a, targets)
    ref = F.cross_entropy(b.float(), targets, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-3 if dtype == torch.bfloat16 else 1e-7)


def test_chunked_cross_entropy_gives_entropy_and_mean_logit_from_the_same_chunks(monkeypatch):
    from fine_tune_llm.train import answer_loss as fast_loss

    monkeypatch.setattr(fast_loss, "CE_CHUNK_ELEMENTS", 3 * 1000)
    torch.manual_seed(1)
    logits = torch.randn(7, 1000) * 4
    targets = torch.randint(1000, (7,))
    nll, _, entropy, mean = ChunkedCrossEntropy.apply(logits, targets, True)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, logits.mean(-1))
    torch.testing.assert_close(nll, -logp[torch.arange(7), targets])
    assert ChunkedCrossEntropy.apply(logits, targets)[2].numel() == 0  # not asked for: not computed


def test_chunked_cross_entropy_edge_cases():
    empty = torch.zeros(0, 7, requires_grad=True)
    nll, *_ = ChunkedCrossEntropy.apply(empty, torch.zeros(0, dtype=torch.long))
    nll.sum().backward()  # a micro-batch without answer tokens: a zero loss that still backpropagates
    assert nll.numel() == 0 and empty.grad.shape == (0, 7)
    with torch.no_grad():  # evaluation: no gradient is computed or stored
        assert ChunkedCrossEntropy.apply(torch.randn(2, 7), torch.tensor([1, 2]))[0].shape == (2,)
    x = torch.randn(2, 7, requires_grad=True)
    loss = ChunkedCrossEntropy.apply(x, torch.tensor([1, 2]))[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


# --- frozen weights stay bf16 -----------------------------------------------------------------------------

def test_frozen_weights_stay_bf16_and_unchanged_unless_upcast_is_asked_for():
    cfg = make_config("tiny", dtype="bfloat16")  # explicit: auto is float32 on CPUs without native bf16
    loaded = {n: p.detach().clone() for n, p in load_model(cfg).named_parameters()
              if p.__class__.__name__ != "Params4bit"}
    model = add_lora(load_model(cfg), cfg)
    frozen = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()
              if not p.requires_grad and p.__class__.__name__ != "Params4bit"}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    for name, p in frozen.items():
        assert torch.equal(p, loaded[name]), name  # bf16 -> fp32 -> bf16 is exact
    upcast = add_lora(load_model(cfg), make_config("tiny", dtype="bfloat16", upcast_frozen=True))
    emb = upcast.get_input_embeddings().weight
    assert emb.dtype == torch.float32  # peft's prepare_model_for_kbit_training, as before

