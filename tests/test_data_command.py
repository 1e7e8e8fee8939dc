"""`fine-tune-llm data FILE`: the detected format, counts per split, token lengths, cuts and one row with its trained
tokens marked, on the real chatterbot conversations and the real psychology data, with gemma-2b-it's tokenizer."""

from __future__ import annotations

import re

from fine_tune_llm.cli import main
from tests.conftest import CHATTERBOT, GEMMA_TOKENIZER, REAL_DATA, need


def data_command(capsys, *args: str) -> str:
    assert main(["data", *args]) == 0
    return capsys.readouterr().out


def trained_spans(out: str) -> list[str]:
    shown = out.split("trained tokens between [[ and ]]:\n", 1)[1]
    return re.findall(r"\[\[(.*?)\]\]", shown, flags=re.DOTALL)


def test_the_chatterbot_conversations(capsys):
    out = data_command(capsys, str(need(CHATTERBOT)), "--base-model", str(need(GEMMA_TOKENIZER)))
    assert "format: messages (detected from the columns)" in out
    assert "rows: 2,026 read, 1,128 duplicate(s) dropped, 898 kept: 69 multi-turn, 1,052 assistant turns" in out
    assert re.search(r"train\s+713\s+600\s+56\s+845\s+0", out)  # rows, groups, multi-turn, turns, with rejected
    assert "p50" in out and "cut (turns dropped)" in out
    shown = re.search(r"row (\d+) \(train split, (\d) assistant turn\(s\), (\d) trained, status ok\)", out)
    assert shown and shown.group(2) == shown.group(3) and int(shown.group(3)) >= 2  # a multi-turn row is shown
    spans = trained_spans(out)
    assert len(spans) == int(shown.group(3)) and all(s.endswith("<end_of_turn>") for s in spans)
    # --train-on last marks only the final answer of the same row; --row picks a row.
    out = data_command(capsys, str(CHATTERBOT), "--base-model", str(GEMMA_TOKENIZER), "--train-on", "last",
                       "--row", shown.group(1))
    assert len(trained_spans(out)) == 1 and "training on the final assistant turn" in out


def test_the_psychology_parquet(capsys):
    out = data_command(capsys, str(need(REAL_DATA)), "--base-model", str(need(GEMMA_TOKENIZER)))
    assert "format: question-response (detected from the columns)" in out
    assert "rows: 9,846 read" in out and "0 multi-turn" in out
    assert re.search(r"test\s+\d+\s+\d+\s+0\s+\d+\s+\d+", out)
    assert "split by near-duplicate clusters (word-set Jaccard >= 0.8, minhash-lsh, 128 permutations)" in out
    twins = re.search(r"test questions with a near-twin in train \(word-set Jaccard >= 0.8 / 0.7\): (\d+) / (\d+) "
                      r"of ([\d,]+)", out)
    assert twins and int(twins.group(1)) <= 0.05 * int(twins.group(3).replace(",", "")) <= int(twins.group(2))
    (span,) = trained_spans(out)
    assert span.endswith("<end_of_turn>") and "<start_of_turn>" not in span


def test_the_shipped_sample_with_the_tiny_preset(capsys):
    out = data_command(capsys, "--preset", "tiny")
    assert "format: question-response (detected from the columns)" in out and "rows: 160 read" in out


def test_a_tokenizer_only_on_an_unreachable_hub_is_one_message(capsys):
    assert main(["data", "sample", "--preset", "smollm2-135m"]) == 2  # HF_HUB_OFFLINE=1 in the tests
    err = capsys.readouterr().err
    assert err.startswith("error: HuggingFaceTB/SmolLM2-135M-Instruct is not a local path and HF_HUB_OFFLINE=1")
    assert "--base-model DIR" in err and "Traceback" not in err
