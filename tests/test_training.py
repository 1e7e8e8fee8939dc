"""QLoRA training on the tiny preset: the loss drops, the adapter reloads exactly, the CPU 4-bit guard holds."""

import pytest
import torch

from fine_tune_llm.model.loading import add_lora, load_model, load_tokenizer
from tests.conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("train"), max_steps=24, eval_steps=12, save_steps=12)


def test_twenty_plus_qlora_steps_lower_the_training_loss(trained):
    cfg, result = trained
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in result.log_history if "eval_loss" in h]
    assert result.global_step == 24
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert evals[-1] < evals[0], evals
    assert cfg.quantization == "4bit"
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())


def test_run_directory_holds_adapter_tokenizer_config_and_logs(trained):
    _, result = trained
    adapter = result.adapter_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "generation_config.json", "training_config.yaml"):
        assert (adapter / name).is_file(), name
    assert (result.run_dir / "config.yaml").is_file()
    assert list((result.run_dir / "logs").glob("events.out.tfevents.*"))
    import json

    gen = json.loads((adapter / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [1, 5]  # <eos> and <end_of_turn> in the tiny vocabulary


def test_saved_adapter_gives_the_same_logits_as_the_model_in_memory(trained):
    from peft import PeftModel

    cfg, result = trained
    tok = load_tokenizer(cfg)
    batch = tok(["I feel anxious before every exam.", "My sleep is a mess lately."], return_tensors="pt",
                padding=True)
    in_memory = result.model.eval()
    # Prepared as in training (add_lora keeps the frozen weights in bf16, as loaded), adapter weights kept in the
    # dtype they were trained in.
    base = load_model(cfg)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        a = in_memory(**batch).logits.float()
        b = reloaded(**batch).logits.float()
    assert torch.equal(a, b) or torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def grads_before_and_after_eval(cfg, guard: bool):
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg), cfg)
    for name, p in model.named_parameters():  # non-zero B so every LoRA matrix gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if not guard:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = modeling_has_avx512bf16()
    batch = tok(["It sounds like a hard week. Be gentle with yourself."], return_tensors="pt")
    before = lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)  # the eval pass that repacks 4-bit weights on AVX512-BF16 CPUs
    after = lora_grads(model, batch)
    return before, after


def modeling_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return has_avx512bf16()


def test_the_adapter_starts_from_the_runs_seed_whatever_ran_before(tiny_cfg):
    """Notebook 02 wraps the model with LoRA before train() seeds: its adapter must start where the terminal's
    run of the same config starts, not wherever the kernel's random state happened to be."""

    def lora_a(earlier_draws: int) -> dict[str, torch.Tensor]:
        torch.rand(earlier_draws)  # whatever the kernel drew before
        model = add_lora(load_model(tiny_cfg), tiny_cfg)
        return {k: v for k, v in model.state_dict().items() if "lora_A" in k}

    first, second = lora_a(1), lora_a(7)
    assert first and all(torch.equal(first[k], second[k]) for k in first)


def test_lora_gradients_are_identical_before_and_after_an_eval_pass(tiny_cfg):
    before, after = grads_before_and_after_eval(tiny_cfg, guard=True)
    assert len(before) == 2 * 7 * 2  # lora_A and lora_B for 7 projections in 2 layers
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_without_the_guard_this_cpu_gets_wrong_gradients(tiny_cfg):
    """Shows the guard is needed: the trap is real on AVX512-BF16 CPUs (skipped where it cannot occur)."""
    try:
        has = modeling_has_avx512bf16()
    except ImportError:
        pytest.skip("this bitsandbytes has no has_avx512bf16()")
    if not has:
        pytest.skip("this CPU has no AVX512-BF16: the repacking path does not exist here")
    before, after = grads_before_and_after_eval(tiny_cfg, guard=False)
    assert any(not torch.allclose(before[n], after[n], rtol=1e-2, atol=1e-6) for n in before)


@pytest.mark.slow
def test_real_small_chat_model_from_gguf_loads_in_4bit_and_masks_its_own_turn_end(tmp_path, monkeypatch):
    """The smollm2-135m preset on the real GGUF: rewritten once as safetensors, then NF4 like any Hub model."""
    import bitsandbytes as bnb

    from fine_tune_llm.config import make_config
    from fine_tune_llm.data.chat_template import build_messages, encode_batch
    from tests.conftest import SMOLLM_DIR, SMOLLM_GGUF, need

    monkeypatch.setenv("FINE_TUNE_LLM_CACHE", str(tmp_path / "cache"))
    cfg = make_config("smollm2-135m", base_model=str(need(SMOLLM_DIR) / SMOLLM_GGUF), quantization="4bit")
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    out = encode_batch(tok, [build_messages("How do I calm down?")], ["Breathe slowly."], 256)
    trained = [t for t, m in zip(out["input_ids"][0], out["completion_mask"][0]) if m]
    assert tok.decode(trained) == "Breathe slowly.<|im_end|>"


def test_lora_input_casts_are_skipped_only_under_autocast_and_restored_after(tmp_path):
    """Under bf16 autocast peft's cast of each LoRA input to the fp32 adapter dtype is undone by the matmul's own
    cast: skipped while training. A float32 run keeps it (input and weight dtypes must then match)."""
    import dataclasses

    from peft.tuners.tuners_utils import BaseTunerLayer

    from fine_tune_llm.train.sft import lora_inputs_uncast
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    model = add_lora(load_model(dataclasses.replace(cfg, dtype="float32")), cfg)
    flags = lambda: {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)}
    assert flags() == {True}
    with lora_inputs_uncast(model, dataclasses.replace(cfg, dtype="bfloat16")):
        assert flags() == {False}
    assert flags() == {True}
    with lora_inputs_uncast(model, dataclasses.replace(cfg, dtype="float32")):
        assert flags() == {True}


def test_group_by_length_reaches_the_trainers_sampler(tmp_path):
    from fine_tune_llm.train.sft import sft_config
    from tests.conftest import tiny_config

    assert sft_config(tiny_config(tmp_path), tmp_path).train_sampling_strategy == "random"
    grouped = sft_config(tiny_config(tmp_path, group_by_length=True), tmp_path)
    assert grouped.train_sampling_strategy == "group_by_length"


def test_pad_to_multiple_of_bounds_batch_shapes_and_keeps_the_loss(tmp_path):
    """Batches come out at multiples of 16 tokens, the pad tokens carry no loss, and the answer-only loss of a
    batch is the same padded to 16 as padded to its longest row."""
    import dataclasses

    from fine_tune_llm.train.sft import build_trainer, prepare_data
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, padding_free=False, dtype="float32", quantization="none", pad_to_multiple_of=16)
    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok)
    model = add_lora(load_model(cfg), cfg)
    losses = {}
    for pad in (16, None):
        trainer = build_trainer(dataclasses.replace(cfg, pad_to_multiple_of=pad), model, tok, data.tokenized["train"],
                                data.tokenized["validation"], tmp_path / f"run{pad}")
        batch = next(iter(trainer.get_eval_dataloader()))
        rows = data.tokenized["validation"].select(range(len(batch["input_ids"])))
        longest = max(len(ids) for ids in rows["input_ids"])
        assert longest % 16, "the sample batch must need padding for this test to show anything"
        assert batch["input_ids"].shape[1] == (-(-longest // 16) * 16 if pad else longest)
        assert int((batch["labels"] != -100).sum()) == sum(map(sum, rows["completion_mask"]))
        model.eval()
        with torch.no_grad():
            losses[pad] = float(trainer.compute_loss(model, batch))
    assert losses[16] == pytest.approx(losses[None], rel=1e-5)


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward of one training forward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    return sum(saved)


def test_lora_layers_adapts_only_the_top_blocks_and_the_backward_stops_below_them(tmp_path):
    """lora_layers=1 on the 2-block tiny model: adapters on block 1 only; block 0's output needs no gradient, so
    autograd keeps nothing for it and the backward never enters it; at initialisation (B = 0) the loss is the
    same as with every block adapted."""
    from tests.conftest import tiny_config

    tok = load_tokenizer(tiny_config(tmp_path))
    batch = tok(["It sounds like a hard week. Be gentle with yourself."], return_tensors="pt")
    models, needs_grad = {}, {}
    for layers in (None, 1):
        cfg = tiny_config(tmp_path, quantization="none", dtype="float32", lora_layers=layers)
        torch.manual_seed(0)
        models[layers] = add_lora(load_model(cfg), cfg)
    adapted = {n.split("layers.")[1].split(".")[0] for n, p in models[1].named_parameters() if p.requires_grad}
    assert adapted == {"1"}
    assert sum(p.requires_grad for p in models[1].parameters()) == 2 * 7  # lora_A, lora_B x 7 projections
    with torch.no_grad():
        assert float(models[1](**batch, labels=batch["input_ids"]).loss) == pytest.approx(
            float(models[None](**batch, labels=batch["input_ids"]).loss), rel=1e-6)

    def record(module, args, out, i):
        needs_grad[i] = (out[0] if isinstance(out, tuple) else out).requires_grad

    for i, block in enumerate(models[1].get_base_model().model.layers):
        block.register_forward_hook(lambda m, a, out, i=i: record(m, a, out, i))
    top_only, every = saved_activation_bytes(models[1], batch), saved_activation_bytes(models[None], batch)
    assert needs_grad == {0: False, 1: True}
    assert top_only < 0.6 * every, (top_only, every)
    assert all(p.grad is not None for p in models[1].parameters() if p.requires_grad)
