"""Release stage 1 (adapter folder and its card) and stage 4 (Hub push: dry run, transport, no token leaks)."""

from __future__ import annotations

import json
import logging
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from fine_tune_llm.cli import main
from fine_tune_llm.errors import EnvironmentNotReady, ReleaseCheckFailed
from fine_tune_llm.release import check_folder, release_adapter
from fine_tune_llm.release.push import plan_upload, push_folder
from tests.conftest import train_tiny

FAKE_TOKEN = "hf_PlantedFakeReleaseToken5Kq8Zr2Lw7Xv1Nb4"
DATASET = "jkhedri/psychology-dataset"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cfg, _ = train_tiny(tmp_path_factory.mktemp("release-adapter"), max_steps=6, logging_steps=2, eval_steps=6,
                        save_steps=6)
    return Path(cfg.output_dir)


@pytest.fixture(scope="module")
def adapter(run_dir, tmp_path_factory) -> Path:
    return release_adapter(run_dir, tmp_path_factory.mktemp("rel") / "adapter", dataset_id=DATASET)


def test_adapter_folder_has_weights_tokenizer_generation_config_and_no_pickles(adapter, run_dir):
    from transformers import AutoTokenizer

    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "generation_config.json", "training_config.yaml", "README.md"} <= names
    assert "training_args.bin" in {p.name for p in (run_dir / "adapter").iterdir()}  # training writes a pickle
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]  # ... the release does not carry it
    assert (adapter / "adapter_model.safetensors").read_bytes() == (run_dir / "adapter" /
                                                                    "adapter_model.safetensors").read_bytes()
    tok = AutoTokenizer.from_pretrained(adapter)
    gen = json.loads((adapter / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<eos>", "<end_of_turn>"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<bos><start_of_turn>user\nhi<end_of_turn>\n" \
                                                                  "<start_of_turn>model\n"
    # No path of this machine travels with the release.
    for name in ("tokenizer_config.json", "training_config.yaml", "README.md"):
        text = (adapter / name).read_text()
        assert str(run_dir) not in text and "/root/" not in text and ".building-" not in text, name
    settings = yaml.safe_load((adapter / "training_config.yaml").read_text())
    assert settings["lora_r"] == 8 and "output_dir" not in settings


def test_model_card_parses_with_huggingface_hub_and_has_metadata_and_sections(adapter):
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter / "README.md", ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["base_model"] == "tiny-gemma"
    assert meta["library_name"] == "peft"
    assert meta["datasets"] == [DATASET]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"lora", "qlora", "psychology"} <= set(meta["tags"])
    text = card.text
    for heading in ("## Training data", "## Method", "## Hyperparameters", "## Evaluation", "## Limitations",
                    "## Safety"):
        assert heading in text, heading
    assert "| LoRA rank r / alpha / dropout | 8 / 16 / 0.0 |" in text
    assert "| Optimizer steps | 6 |" in text
    assert "train 128, validation 16, test 16" in text
    assert "No evaluation report" in text
    safety = text.split("## Safety", 1)[1]
    assert "not a substitute for professional care" in safety and "988" in safety and "116 123" in safety
    assert check_folder(adapter).ok


def test_card_reports_evaluation_numbers_and_survives_a_partial_report(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    report = {"settings": {"split": "test"}, "hit_max_tokens": {"greedy": {"base": 3, "tuned": 1}},
              "metrics": {"base": {"answers": 16, "pairs": 16, "perplexity": 812.5, "accuracy_normalized": 0.25,
                                   "mean_margin": -0.5},
                          "tuned": {"answers": 16, "pairs": 16, "perplexity": 390.25, "accuracy_normalized": 0.75,
                                    "mean_margin": 0.125}}}
    (copy / "report.json").write_text(json.dumps(report))
    text = (release_adapter(copy, tmp_path / "a") / "README.md").read_text()
    assert "held-out **test** split (16 answers, 16 preference pairs)" in text
    assert "| Perplexity on held-out answers (lower is better) | 812.5000 | 390.2500 |" in text
    assert "| Mean margin, nats/token (chosen - rejected) | -0.5000 | 0.1250 |" in text
    assert "base 3, tuned 1" in text
    # A report from an older or newer evaluation: missing and oddly typed fields must not break the card.
    (copy / "report.json").write_text(json.dumps({"metrics": {"base": {"perplexity": "n/a"}, "tuned": None}}))
    text = (release_adapter(copy, tmp_path / "b") / "README.md").read_text()
    assert "No evaluation report" in text
    (copy / "report.json").write_text("{not json")
    assert check_folder(release_adapter(copy, tmp_path / "c")).ok


def test_check_finds_a_generation_config_that_never_stops_at_the_end_of_turn(adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    gen = json.loads((broken / "generation_config.json").read_text())
    gen["eos_token_id"] = 1  # <eos> alone: gemma-2b-it's own config, which talks past its turn
    (broken / "generation_config.json").write_text(json.dumps(gen))
    (broken / "training_args.bin").write_bytes(b"pickle")
    result = check_folder(broken)
    assert not result.ok
    assert any("<end_of_turn> (5)" in e for e in result.errors), result.errors
    assert any("training_args.bin" in e for e in result.errors), result.errors
    with pytest.raises(ReleaseCheckFailed, match="eos_token_id"):
        push_folder(broken, "someone/model", dry_run=True)


def test_dry_run_lists_exactly_the_files_upload_folder_would_send(adapter, tmp_path, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # upload_folder never sends .git/
    expected = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    assert plan_upload(folder) == expected
    assert main(["release", "push", str(folder), "me/tiny-adapter", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload to me/tiny-adapter (private):" in out
    for name, size in expected:
        assert f"{size:,} B  {name}" in out
    assert ".git" not in out
    assert f"{len(expected)} files" in out


class FakeHfApi:
    """Stands in for the Hub transport only: records what our function asks of it."""

    calls: typing.ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("__init__", kwargs))

    def create_repo(self, **kwargs):
        FakeHfApi.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc"


def test_push_sends_the_checked_folder_to_the_repo_and_no_token_appears_anywhere(adapter, tmp_path, monkeypatch,
                                                                                   capsys, caplog):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    caplog.set_level("DEBUG")
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    assert main(["-v", "release", "push", str(folder), "me/tiny-adapter", "--dry-run"]) == 0
    assert FakeHfApi.calls == []  # a dry run never builds a client
    assert main(["-v", "release", "push", str(folder), "me/tiny-adapter", "--message", "first release"]) == 0
    kinds = [c[0] for c in FakeHfApi.calls]
    assert kinds == ["__init__", "create_repo", "upload_folder"]
    create, upload = FakeHfApi.calls[1][1], FakeHfApi.calls[2][1]
    assert create == {"repo_id": "me/tiny-adapter", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-adapter" and Path(upload["folder_path"]) == folder
    assert upload["commit_message"] == "first release" and upload["repo_type"] == "model"
    assert all("token" not in kwargs for _, kwargs in FakeHfApi.calls)  # the client finds it itself

    # Notebook path: the same function with the fake injected directly.
    FakeHfApi.calls = []
    result = push_folder(folder, "me/tiny-adapter", api=FakeHfApi(), private=False)
    assert result.commit_url.endswith("/commit/0123abc") and FakeHfApi.calls[1][1]["private"] is False

    out = capsys.readouterr()
    texts = [out.out, out.err, caplog.text, repr(result)]
    assert "uploaded to me/tiny-adapter" in out.out
    assert not [t for t in texts if FAKE_TOKEN in t]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # pushing writes nothing
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_push_without_a_token_says_how_to_log_in(adapter, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(EnvironmentNotReady, match="HF_TOKEN.*hf auth login"):
        push_folder(adapter, "me/tiny-adapter")


def test_push_refuses_a_folder_that_is_not_a_release(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReleaseCheckFailed, match="not a release folder"):
        push_folder(tmp_path, "me/x", dry_run=True)


def test_a_base_loaded_from_a_local_folder_is_published_under_its_hub_id(run_dir, tmp_path):
    out = release_adapter(run_dir, tmp_path / "a", base_model_id="someone/tiny-gemma-base", license="apache-2.0")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "someone/tiny-gemma-base"  # training wrote a cache folder here
    meta = check_folder(out)
    assert meta.ok and meta.facts["card"]["base_model"] == "someone/tiny-gemma-base"
    assert not [w for w in meta.warnings if "base_model" in w]
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".yaml", ".jinja"):
            assert "/root/" not in path.read_text() and "fine_tune_llm/tiny" not in path.read_text(), path.name


def test_a_failed_stage_leaves_no_release_folder(run_dir, tmp_path, monkeypatch):
    """The licence is checked before any work, and a folder whose check fails is never put in place."""
    import fine_tune_llm.release.adapter as stage
    from fine_tune_llm.errors import ConfigError
    from fine_tune_llm.release.merge import merge_adapter
    from fine_tune_llm.run import RunDir

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load((copy / "adapter" / "training_config.yaml").read_text())
    config["base_model"] = "/models/some-local-llm"  # no Hub id, so no known licence
    (copy / "adapter" / "training_config.yaml").write_text(yaml.safe_dump(config))

    def no_model(*args, **kwargs):
        raise AssertionError("the merge loaded a model before checking the licence")

    monkeypatch.setattr("fine_tune_llm.release.merge.open_run", no_model)
    with pytest.raises(ConfigError, match="no known licence for base model 'some-local-llm'"):
        merge_adapter(copy)
    release = RunDir.of(copy).release_dir("merged").parent
    assert not release.exists() or not any(release.iterdir())

    failing = check_folder(tmp_path)  # not a release folder: a check result with errors
    monkeypatch.setattr(stage, "check_adapter", lambda folder: failing)
    with pytest.raises(ReleaseCheckFailed):
        release_adapter(run_dir, tmp_path / "out" / "adapter", dataset_id=DATASET)
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its staging copy


def test_a_metadata_hint_is_said_once_and_names_the_release_folder(run_dir, tmp_path, caplog):
    out = tmp_path / "adapter"
    with caplog.at_level(logging.WARNING, logger="fine_tune_llm.release"):
        release_adapter(run_dir, out, base_model_id="someone/tiny-gemma-base", license="apache-2.0")  # no dataset_id
        push_folder(out, "me/tiny-adapter", dry_run=True)  # checks the same folder again
    hints = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(hints) == 1 and hints[0].startswith(f"{out}: no 'datasets' in the metadata"), hints  # not the staging
    assert "dataset_id=" in hints[0]  # and what to pass


def test_the_offline_toy_gets_no_hub_link_hints(run_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fine_tune_llm.release"):
        out = release_adapter(run_dir, tmp_path / "toy")  # base tiny-gemma, the shipped sample: nothing to link
    assert check_folder(out).warnings == [] and not [r for r in caplog.records if r.levelno == logging.WARNING]
