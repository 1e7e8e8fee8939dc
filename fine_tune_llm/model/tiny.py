"""The offline `tiny` preset: a small Gemma and a SentencePiece tokenizer, built here, cached on disk.

The tokenizer is a real SentencePiece model (like Gemma's `tokenizer.model`) trained on the shipped sample
text, with Gemma's special tokens and gemma-2b-it's exact chat template, so every tool downstream (chat
templating, masking, GGUF conversion) treats it like the real one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..data.chat_template import GEMMA_CHAT_TEMPLATE
from ..data.rows import SAMPLE_DATA, read_rows
from ..files import cache_root

TINY_NAME = "tiny-gemma"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's own vocabulary
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
VOCAB_SIZE = 1024
MODEL_SHAPE = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 1024}
BUILD_VERSION = "2"
PRETRAIN_STEPS = 150


def tiny_model_dir() -> Path:
    """Build (once) and return the directory holding the tiny model and tokenizer."""
    key = hashlib.sha256(json.dumps([BUILD_VERSION, VOCAB_SIZE, MODEL_SHAPE]).encode()
                         + SAMPLE_DATA.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"{TINY_NAME}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        build_tokenizer(tmp)
        build_model(tmp)
        try:
            os.rename(tmp, target)  # atomic: parallel builders (tests, DDP ranks) never see half a model
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _training_text() -> list[str]:
    rows = read_rows(SAMPLE_DATA)
    return [r[c] for r in rows for c in ("question", "response_j", "response_k")]


def build_tokenizer(out: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    # Gemma's tokenizer: BPE, byte fallback, split digits, no dummy prefix, identity normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=buf, vocab_size=VOCAB_SIZE, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=TURN_TOKENS, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        hard_vocab_limit=False, num_threads=1, seed_sentencepiece_size=100000, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": TURN_TOKENS, "chat_template": GEMMA_CHAT_TEMPLATE,
        "padding_side": "right", "clean_up_tokenization_spaces": False,
    }, indent=2))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json for fast loading


def build_model(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)
    config = GemmaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **MODEL_SHAPE)
    torch.manual_seed(0)
    model = GemmaForCausalLM(config)
    pretrain(model, tok)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    model.save_pretrained(out, safe_serialization=True)


def pretrain(model, tok, steps: int = PRETRAIN_STEPS, batch_size: int = 16) -> None:
    """Give the tiny base model a personality to adapt: a curt assistant that answers with response_k.

    A random model teaches nothing: its loss sits at ln(vocab) and LoRA barely moves it. Pre-trained on
    chat-formatted (question, response_k) turns, it knows the template, ends its turns with <end_of_turn>,
    and prefers the judgmental answer - so fine-tuning on response_j has a visible direction to move in.
    """
    import torch

    rows = read_rows(SAMPLE_DATA)
    convs = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response_k"]}]
             for r in rows]
    ids = [tok.apply_chat_template(c, tokenize=True)["input_ids"] for c in convs]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(ids), (batch_size,), generator=gen).tolist()
        width = max(len(ids[i]) for i in pick)
        x = torch.full((batch_size, width), tok.pad_token_id)
        for row, i in enumerate(pick):
            x[row, : len(ids[i])] = torch.tensor(ids[i])
        labels = x.masked_fill(x == tok.pad_token_id, -100)
        loss = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
