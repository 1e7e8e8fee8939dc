"""Checks every release folder shares: tokenizer, generation config, model card, no pickles. Each stage module
adds its own check on top (folders.py maps a folder's kind to it)."""

from __future__ import annotations

from pathlib import Path

from ..files import read_json
from .common import CheckResult, pickle_files
from .modelcard import validate_card


def check_common(result: CheckResult, card_kind: str) -> None:
    """Model card, and no pickled files."""
    errors, warnings, meta = validate_card(result.folder / "README.md", card_kind)
    result.errors += errors
    result.warnings += warnings
    result.facts["card"] = meta
    pickles = pickle_files(result.folder)
    if pickles:
        result.errors.append(f"pickled file(s) {', '.join(pickles)} can run code when loaded: remove them")


def check_tokenizer(result: CheckResult, need_sp_model: bool = False):
    """Tokenizer loads, has a chat template, and generation_config.json stops on <eos> and the turn end.

    Returns the tokenizer (or None when it does not load)."""
    from transformers import AutoTokenizer

    from ..data.chat_template import turn_end

    folder = result.folder
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a tokenizer that does not load is a failed check, with its cause
        result.errors.append(f"tokenizer does not load from {folder} ({type(exc).__name__}: {str(exc)[:200]})")
        return None
    if not tok.chat_template:
        result.errors.append("tokenizer has no chat template (chat_template.jinja / tokenizer_config.json)")
        return tok
    end = turn_end(tok)
    end_id = tok.convert_tokens_to_ids(end) if end else None
    if end_id is None or end_id == tok.unk_token_id:
        result.errors.append(f"the chat template's end-of-turn {end!r} is not one token of the vocabulary")
    result.facts["turn_end"] = end
    gen = read_json(folder / "generation_config.json")
    if gen is None:
        result.errors.append("generation_config.json is missing or unreadable")
    else:
        eos = gen.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos])
        want = {tok.eos_token_id, end_id} - {None}
        if not want <= eos:
            names = ", ".join(f"{tok.convert_ids_to_tokens(i)} ({i})" for i in sorted(want - eos))
            result.errors.append(f"generation_config.json eos_token_id {sorted(e for e in eos if e is not None)} "
                                 f"lacks {names}: generation would not stop at the end of the turn")
        result.facts["eos_token_id"] = sorted(e for e in eos if e is not None)
    if not (folder / "tokenizer.model").is_file() and sentencepiece_based(folder):
        msg = ("tokenizer.model (SentencePiece) is missing: llama.cpp's converter and slow tokenizers need it; pass "
               "tokenizer_model= (--tokenizer-model) with the base model's file")
        (result.errors if need_sp_model else result.warnings).append(msg)
    return tok


def sentencepiece_based(folder: Path) -> bool:
    """Whether tokenizer.json was converted from a SentencePiece model (Gemma, Llama 2, Mistral): a Unigram
    model, or BPE with byte fallback. Byte-level BPE tokenizers (GPT-2 style, SmolLM2) have no tokenizer.model."""
    data = read_json(folder / "tokenizer.json") or {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))
