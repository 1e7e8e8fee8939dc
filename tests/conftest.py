"""Shared fixtures. Everything runs offline on CPU; ../shared is used when present and skipped when not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "psychology-dataset" / "psychology_dataset.parquet"
GEMMA_TOKENIZER = SHARED / "models" / "gemma-tokenizer"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATTERBOT = SHARED / "data" / "chatterbot-corpus" / "english_messages.jsonl"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is for development and CI only)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fine_tune_llm.config import make_config
    from fine_tune_llm.model.loading import load_tokenizer

    return load_tokenizer(make_config("tiny"))


@pytest.fixture(scope="session")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(need(GEMMA_TOKENIZER))
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, read from the GGUF (no weights are loaded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(need(SMOLLM_DIR / SMOLLM_GGUF).parent, gguf_file=SMOLLM_GGUF)
    tok.padding_side = "right"
    return tok


def chatterbot_rows() -> list[dict]:
    """The real chatterbot conversations (messages format), read from ../shared: never copied into the project."""
    import json

    return [json.loads(line) for line in need(CHATTERBOT).read_text().splitlines() if line.strip()]


def tiny_config(root: Path, run: str = "run", **overrides):
    """The tiny preset with its run directory, metrics and plots all under root (never in the repo)."""
    from fine_tune_llm.config import make_config

    return make_config("tiny", output_dir=str(root / run), metrics_dir=str(root / "metrics"),
                       imgs_dir=str(root / "imgs"), **overrides)


def train_tiny(root: Path, run: str = "run", **overrides):
    """Train the tiny preset from scratch under root: (config, TrainResult)."""
    from fine_tune_llm.train.sft import train

    cfg = tiny_config(root, run, **overrides)
    return cfg, train(cfg, resume=False)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset with every output under tmp_path."""
    return tiny_config(tmp_path)
