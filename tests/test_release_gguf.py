"""Release stage 3: GGUF conversion with llama.cpp's converter, quantization, and checks in llama-cpp-python.

Needs the optional `gguf` group (llama-cpp-python; `make test` installs it) and, on first use, PyPI to fetch
the llama-cpp-python source distribution that holds the converter (cached afterwards).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fine_tune_llm.release import check_folder
from fine_tune_llm.release.gguf_export import (
    GGUFFile,
    export_gguf,
    fix_special_tokens,
    llama_cpp_tree,
    read_special_tokens,
)
from fine_tune_llm.release.modelfile import (
    default_system_prompt,
    modelfile_matches,
    render_ollama_prompt,
    write_modelfile,
)
from tests.conftest import train_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="the optional gguf group is not installed "
                                                   "(poetry install --with gguf)")


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    from fine_tune_llm.release.merge import merge_adapter
    cfg, _ = train_tiny(tmp_path_factory.mktemp("release-gguf"), max_steps=8, logging_steps=4, eval_steps=8,
                        save_steps=8)
    return merge_adapter(cfg.output_dir, n_prompts=2, n_eval=8).folder


@pytest.fixture(scope="module")
def gguf(llama_cpp, merged):
    return export_gguf(merged, quants=("q8_0", "q4_k_m"))


def test_gguf_files_load_end_their_turn_and_stop_by_themselves(gguf, merged):
    assert gguf.folder == merged.parent / "gguf"
    assert [f.quant for f in gguf.files] == ["f16", "q8_0", "q4_k_m"]
    assert (Path(gguf.converter) / "convert_hf_to_gguf.py").is_file()
    for f in gguf.files:
        v = f.verification
        assert v["passed"], (f.name, v["failures"])
        assert v["eot_token"] == "<end_of_turn>" and v["metadata_eot_id"] == 5
        assert v["end_of_generation_tokens"] == ["<end_of_turn>", "<eos>"]
        assert v["tokenizer_matches"] and v["chat_template_in_metadata"]
        assert v["stopped_on"] == "<end_of_turn>" and 0 < v["new_tokens"] < 512
    types = {f.quant: f.tensor_types for f in gguf.files}
    assert set(types["f16"]) == {"F16", "F32"} and set(types["q8_0"]) == {"Q8_0", "F32"}
    # The converter's Gemma class writes CodeGemma's id 107 as end-of-turn; in this vocabulary that is a byte.
    assert gguf.metadata_fixes == ["eot_token_id 107 ('<0x65>') -> 5 ('<end_of_turn>')"]
    # Rows of 128 values cannot hold 256-value k-quant blocks: llama.cpp falls back per tensor, and we say so.
    note = gguf.files[2].note
    assert "13 of 15 weight tensors have rows of 128 values" in note and "Q5_0" in note
    assert types["q4_k_m"].get("Q4_K", 0) + types["q4_k_m"].get("Q6_K", 0) == 2  # the 512-wide ffn_down
    sizes = {f.quant: f.bytes for f in gguf.files}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]


def test_modelfile_stops_at_end_of_turn_and_its_template_matches_the_chat_template(gguf, merged):
    from transformers import AutoTokenizer

    text = (gguf.folder / "Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in text.splitlines()
    assert "FROM ./model-q4_k_m.gguf" in text.splitlines()
    tok = AutoTokenizer.from_pretrained(merged)
    question = "How do I stop worrying?"
    hf = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert "<bos>" + render_ollama_prompt(text, question) == hf  # llama.cpp adds <bos> itself
    assert gguf.modelfile_matches_template is True


def test_chatml_modelfile_carries_the_templates_default_system_prompt(tmp_path):
    """SmolLM2's template adds a system message when there is none; Ollama's ChatML template would not."""
    from conftest import SMOLLM_DIR, SMOLLM_GGUF, need
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(need(SMOLLM_DIR), gguf_file=SMOLLM_GGUF)
    system = default_system_prompt(tok)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    files = [GGUFFile("model-q8_0.gguf", "q8_0", 1, {}), GGUFFile("model-f16.gguf", "f16", 2, {})]
    with_system = write_modelfile(tmp_path, files, "<|im_end|>", system)
    assert 'PARAMETER stop "<|im_end|>"' in with_system.read_text() and modelfile_matches(with_system, tok)
    assert modelfile_matches(write_modelfile(tmp_path, files, "<|im_end|>"), tok) is False


def test_gguf_folder_check_and_card(gguf, tmp_path):
    from huggingface_hub import ModelCard

    assert check_folder(gguf.folder).ok
    card = ModelCard.load(gguf.folder / "README.md", ignore_metadata_errors=False)
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags
    assert "| `model-q8_0.gguf` |" in card.text
    assert "rows of 128 values" in card.text and "## Safety" in card.text
    record = json.loads((gguf.folder / "verification.json").read_text())
    assert [f["name"] for f in record["files"]] == [f.name for f in gguf.files]
    # A file changed after verification, or a Modelfile without its stop token, fails the check.
    broken = tmp_path / "gguf"
    shutil.copytree(gguf.folder, broken)
    with open(broken / "model-q8_0.gguf", "ab") as fh:
        fh.write(b"\0" * 32)
    modelfile = broken / "Modelfile"
    modelfile.write_text(modelfile.read_text().replace('PARAMETER stop "<end_of_turn>"\n', ""))
    errors = check_folder(broken).errors
    assert any("model-q8_0.gguf changed since it was verified" in e for e in errors), errors
    assert any('Modelfile has no PARAMETER stop "<end_of_turn>"' in e for e in errors), errors


def test_special_token_ids_that_name_ordinary_tokens_are_fixed(llama_cpp, tmp_path):
    """FIM ids 67-70 and eot 107 are CodeGemma's; llama.cpp ends generation on the FIM separator."""
    import gguf as gguf_py

    path = tmp_path / "vocab.gguf"
    writer = gguf_py.GGUFWriter(str(path), "gemma")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|fim_prefix|>", "a", "b"]
    writer.add_token_list(tokens)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 8)  # "b"
    writer.add_uint32("tokenizer.ggml.prefix_token_id", 6)  # a real FIM token: kept
    writer.add_uint32("tokenizer.ggml.middle_token_id", 7)  # "a": removed
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fixes = fix_special_tokens(path, llama_cpp_tree(), "<end_of_turn>")
    assert read_special_tokens(path)[0] == {"eot": 5, "prefix": 6}
    assert fixes == ["eot_token_id 8 ('b') -> 5 ('<end_of_turn>')", "removed middle_token_id 7 ('a' is not a FIM token)"]


def test_without_the_gguf_group_export_stops_at_once_naming_the_install_command(tmp_path, monkeypatch, capsys):
    """llama-cpp-python is an optional group: without it `release gguf` says `make install-gguf` before any work
    (here the folder is not even a merged model: the missing tool is reported first)."""
    import builtins
    import sys

    from fine_tune_llm.cli import main

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_llama)
    assert main(["release", "gguf", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run `make install-gguf`" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
