"""The blocks below the lowest adapted one run once for all columns (eval/shared_trunk.py), with the numbers of
running every column whole."""

from __future__ import annotations

import pytest
import torch

from fine_tune_llm.data.rows import SAMPLE_DATA, read_rows
from fine_tune_llm.eval.scoring import encode_answers, score_parts
from fine_tune_llm.eval.shared_trunk import SharedTrunk, trunk_layers


def two_adapters(layers):
    """The tiny model with two random (non-zero) LoRA adapters on the given blocks, "one" and "two"."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fine_tune_llm.model.tiny import tiny_model_dir

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=layers,
                      init_lora_weights=False)
    model: PeftModel = get_peft_model(base, lora, adapter_name="one")
    model.add_adapter("two", lora)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir())


@pytest.fixture(scope="module")
def parts():
    _, tokenizer = two_adapters([1])
    rows = read_rows(SAMPLE_DATA)[:12]
    enc = encode_answers(tokenizer, [r["question"] for r in rows], [r["response_j"] for r in rows], 256)
    rejected = encode_answers(tokenizer, [r["question"] for r in rows], [r["response_k"] for r in rows], 256)
    return tokenizer, {"chosen": enc, "rejected": rejected}


def columns(model):
    """The evaluation's columns: every adapter off, then each adapter on."""
    yield "base", model.disable_adapter()
    for name in ("one", "two"):
        model.set_adapter(name)
        yield name, torch.no_grad()


def score_every_column(model, tokenizer, parts, trunk=None):
    out = {}
    for n, (name, switch) in enumerate(columns(model)):
        with switch, (trunk.replay() if n else trunk.record()) if trunk else torch.no_grad():
            scored = score_parts(model, tokenizer, parts, batch_size=4, progress=False)
        out[name] = {k: (s.nats, s.tokens) for k, s in scored.items()}
    return out


def count_block_calls(layers):
    """Calls that really computed each block (its attention ran), by block index."""
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_later_columns_start_at_the_lowest_adapted_block_with_the_same_numbers(parts):
    tokenizer, parts = parts
    model, _ = two_adapters([1])
    whole = score_every_column(model, tokenizer, parts)
    assert whole["base"] != whole["one"] != whole["two"]  # the adapters change the numbers
    trunk = SharedTrunk(model)
    assert trunk.first == 1
    calls = count_block_calls(trunk.layers)
    shared = score_every_column(model, tokenizer, parts, trunk)
    assert shared == whole  # the same tensors went on: equal, not merely close
    # 24 sequences, 12 pairs packed in rows (the prompt once): the first column's calls ran block 0, no other did.
    assert calls[0] == len(trunk.kept) and calls[1] == 3 * len(trunk.kept) > 0


def test_past_the_memory_budget_the_remaining_calls_run_whole(parts):
    tokenizer, parts = parts
    model, _ = two_adapters([1])
    whole = score_every_column(model, tokenizer, parts)
    first = SharedTrunk(model)
    with first.record():
        score_parts(model, tokenizer, parts, batch_size=4, progress=False)
    one_call = first.kept[0][1].numel() * 4
    trunk = SharedTrunk(model, keep_bytes=one_call)
    calls = count_block_calls(trunk.layers)
    assert score_every_column(model, tokenizer, parts, trunk) == whole
    total = calls[1] // 3
    assert len(trunk.kept) == 1 < total and calls[0] == total + 2 * (total - 1)


def test_a_later_column_with_other_calls_is_refused(parts):
    tokenizer, parts = parts
    model, _ = two_adapters([1])
    trunk = SharedTrunk(model)
    with trunk.record():
        score_parts(model, tokenizer, parts, batch_size=4, progress=False)
    with trunk.replay(), pytest.raises(RuntimeError, match="differs from the first column's"):
        score_parts(model, tokenizer, {"chosen": parts["rejected"]}, batch_size=4, progress=False)
    # the hooks are gone: the model runs whole again
    assert "forward" not in trunk.layers[0].__dict__


def test_nothing_is_shared_when_the_first_block_or_the_embedding_is_adapted():
    model, _ = two_adapters(None)
    assert trunk_layers(model)[1] == 0 and not SharedTrunk(model).shares
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fine_tune_llm.model.tiny import tiny_model_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    embedded = get_peft_model(base, LoraConfig(r=4, target_modules=["down_proj"], layers_to_transform=[1],
                                               modules_to_save=["embed_tokens"]))  # a retrained embedding
    assert trunk_layers(embedded)[1] == 0
