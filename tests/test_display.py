"""Notebook-facing helpers: the masked view shows exactly the trained tokens; tables hold the right values."""

import re

import pytest

from fine_tune_llm.data.chat_template import build_messages, encode_batch, render_prompt
from fine_tune_llm.model import hardware
from fine_tune_llm.notebook import display
from fine_tune_llm.notebook import paths as notebook_utils

QUESTION = "I feel anxious before every exam. Is that normal? 😟"
ANSWER = "It's very common to feel anxious before exams, and it shows you care. Breathing slowly can help – really."


@pytest.fixture(params=["tiny", "gemma"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("gemma_tokenizer")


def encoded(tok):
    out = encode_batch(tok, [build_messages(QUESTION)], [ANSWER], max_length=256)
    return out["input_ids"][0], out["completion_mask"][0]


def test_token_pieces_join_to_the_decoded_text(tokenizer):
    ids, _ = encoded(tokenizer)
    pieces = display.token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
    assert pieces[0] == "<bos>"


def test_masked_view_text_marks_exactly_the_answer_and_end_of_turn(tokenizer):
    ids, mask = encoded(tokenizer)
    view = display.masked_view(tokenizer, ids, mask)
    legend, body = str(view).split("\n", 1)
    assert legend.startswith(f"{len(ids) - sum(mask)} prompt tokens") and f"{sum(mask)} trained tokens" in legend
    assert re.findall(r"\[\[(.*?)\]\]", body, flags=re.DOTALL) == [ANSWER + "<end_of_turn>"]
    assert body.split("[[")[0] == render_prompt(tokenizer, build_messages(QUESTION))


def test_masked_view_html_highlights_trained_tokens_and_escapes_specials(tokenizer):
    ids, mask = encoded(tokenizer)
    page = display.masked_view(tokenizer, ids, mask)._repr_html_()
    assert page.count(display.TRAINED_STYLE) == sum(mask)
    assert page.count(display.PROMPT_STYLE) == len(ids) - sum(mask)
    assert "&lt;bos&gt;" in page and "<bos>" not in page
    last_trained = page.rsplit(display.TRAINED_STYLE, 1)[1]
    assert "&lt;end_of_turn&gt;</span>" in last_trained


def test_masked_view_rejects_a_mask_of_the_wrong_length(tiny_tokenizer):
    with pytest.raises(ValueError, match="3 tokens but completion_mask has 2"):
        display.masked_view(tiny_tokenizer, [2, 5, 6], [0, 1])


def test_conversation_text_is_the_template_rendering(tiny_tokenizer):
    text = display.conversation_text(tiny_tokenizer, "How do I cope?", "Step by step.")
    assert text == ("<bos><start_of_turn>user\nHow do I cope?<end_of_turn>\n"
                    "<start_of_turn>model\nStep by step.<end_of_turn>\n")


RESULTS = [
    {"question": "q1", "answer": "a1", "new_tokens": 10, "hit_max_tokens": False, "seconds": 0.5},
    {"question": "q2", "answer": "a2", "new_tokens": 30, "hit_max_tokens": True, "seconds": 1.5},
]


def test_answers_frame_and_timing():
    df = display.answers_frame(RESULTS)
    assert df["ms / token"].tolist() == [50.0, 50.0]
    assert df["hit max tokens"].tolist() == [False, True]
    t = display.timing(RESULTS)
    assert (t["new tokens"], t["seconds"], t["ms / token"], t["tokens / s"]) == (40, 2.0, 50.0, 20.0)


def test_side_by_side_accepts_results_and_strings():
    df = display.side_by_side(["q1", "q2"], base=RESULTS, tuned=["t1", "t2"])
    assert df.columns.tolist() == ["question", "base", "tuned"]
    assert df.values.tolist() == [["q1", "a1", "t1"], ["q2", "a2", "t2"]]
    with pytest.raises(ValueError, match="tuned: 1 answers for 2 questions"):
        display.side_by_side(["q1", "q2"], tuned=["t1"])


def test_table_renders_html_and_text():
    out = display.table(display.side_by_side(["q1"], base=["a line\nand another"]))
    assert "white-space: pre-wrap" in out._repr_html_() and "text-align: left" in out._repr_html_()
    assert "question" in repr(out) and "q1" in repr(out)


def test_split_counts(tiny_tokenizer):
    splits = {"train": [{"question": "A?"}, {"question": "a"}, {"question": "B"}], "test": [{"question": "C"}]}
    df = display.split_counts(splits)
    assert df.loc["train"].tolist() == [3, 2] and df.loc["test"].tolist() == [1, 1]


def test_model_summary_of_a_4bit_lora_model(tiny_cfg):
    from fine_tune_llm.model.loading import add_lora, load_model, memory_footprint_mb, parameter_counts

    base = load_model(tiny_cfg)
    before = display.model_summary(base)["value"]
    compute = hardware.precision(tiny_cfg).dtype  # bfloat16 where the CPU has it natively, else float32
    assert before["quantization"] == f"4-bit NF4, double quantization, compute in {compute}"
    assert before["LoRA"] == "none" and before["parameters"] == f"{parameter_counts(base)[1]:,}"
    model = add_lora(base, tiny_cfg)
    info = display.model_summary(model)["value"]
    trainable, total = parameter_counts(model)
    assert trainable > 0
    assert info["trainable parameters"] == f"{trainable:,} ({100 * trainable / total:.3f}% of {total:,})"
    assert info["LoRA"] == "r=8, alpha=16 (scale 2), dropout=0.0"
    assert info["LoRA target modules"] == "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    assert info["memory footprint"] == f"{memory_footprint_mb(model):,.1f} MB"


def test_recipe_shows_what_the_preset_and_the_knobs_made():
    from fine_tune_llm.config import make_config

    tiny = display.recipe(make_config("tiny"))["value"]
    assert (tiny["LoRA"], tiny["learning rate"], tiny["length"]) == ("r=8, alpha=16", "0.003", "30 optimizer steps")
    gemma = display.recipe(make_config("gemma-2b-it", learning_rate=1e-4, data_samples=500))["value"]
    assert (gemma["learning rate"], gemma["length"]) == ("0.0001", "1 epoch(s)")
    assert gemma["data"] == "jkhedri/psychology-dataset (first 500 rows)" and gemma["batch"] == "4 rows x 4 accumulated"


def test_files_table(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 2048)
    (tmp_path / "a.json").write_text("{}")
    df = display.files_table(tmp_path)
    assert df.values.tolist() == [["a.json", 0.0], ["sub/b.bin", 2.0]]


def test_repo_path_resolves_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = notebook_utils.repo_root()
    assert (root / "pyproject.toml").is_file() and (root / "fine_tune_llm").is_dir()
    assert notebook_utils.repo_path("notebooks/x") == str(root / "notebooks" / "x")
    assert notebook_utils.repo_path(str(tmp_path)) == str(tmp_path)
    assert notebook_utils.repo_path(None) is None


def test_not_interactive_outside_a_kernel_or_when_headless(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(notebook_utils.HEADLESS_ENV, raising=False)
    assert notebook_utils.interactive() is False  # pytest is not an IPython kernel
    monkeypatch.setenv(notebook_utils.HEADLESS_ENV, "1")
    assert notebook_utils.interactive() is False


def test_training_summary_reads_the_log_history():
    from types import SimpleNamespace

    history = [{"loss": 7.4, "step": 1}, {"eval_loss": 6.9, "step": 2}, {"loss": 6.1, "step": 2}]
    result = SimpleNamespace(log_history=history, global_step=2, train_loss=6.1, eval_loss=6.9, interrupted=False,
                             adapter_dir="runs/x/adapter")
    info = display.training_summary(result)["value"]
    assert (info["optimizer steps"], info["first train loss"], info["final train loss"]) == (2, 7.4, 6.1)
    assert info["final eval loss"] == 6.9 and info["adapter"] == "runs/x/adapter"
