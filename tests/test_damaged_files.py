"""Files cut short or garbled are named, with what to do, in one line without a traceback: the adapter
(evaluate, release, the preference stage), the base model's weights, splits.json, config.yaml. A damaged
checkpoint is skipped for the previous one (test_resume.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fine_tune_llm.cli import main
from fine_tune_llm.config import make_config
from fine_tune_llm.data.rows import load_splits
from fine_tune_llm.errors import DamagedFile
from fine_tune_llm.files import safetensors_problem
from fine_tune_llm.run import RunDir


def weights(path: Path) -> Path:
    save_file({"base_model.model.q.lora_A.weight": torch.ones(8, 64), "base_model.model.q.lora_B.weight":
               torch.zeros(64, 8)}, str(path))
    return path


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory as training leaves it (config, saved split, adapter), without the cost of training."""
    cfg = make_config("tiny", output_dir=str(tmp_path / "run"), metrics_dir=str(tmp_path / "metrics"),
                      imgs_dir=str(tmp_path / "imgs"))
    run = RunDir.of(cfg.output_dir)
    run.write_config(cfg)
    run.save_splits(load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction),
                    cfg.dataset)
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    weights(run.adapter_dir / "adapter_model.safetensors")
    shutil.copyfile(run.config_file, run.adapter_dir / "training_config.yaml")
    return run


def cut(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


def one_error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: "):].strip()


def test_safetensors_problems_are_told_apart(tmp_path):
    path = weights(tmp_path / "w.safetensors")
    size = path.stat().st_size
    assert safetensors_problem(path) is None
    cut(path, size - 1)
    assert safetensors_problem(path) == f"it has {size - 1:,} bytes, its header describes {size:,}: it was cut short"
    cut(path, 100)
    assert "but its header alone claims" in safetensors_problem(path)
    cut(path, 3)
    assert safetensors_problem(path) == "it has 3 bytes, not even a header: it was cut short"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    assert safetensors_problem(path) == "its header is not readable: the file is garbled"


def test_a_truncated_adapter_is_named_by_evaluate_and_release(run, capsys):
    weights_file = run.adapter_dir / "adapter_model.safetensors"
    cut(weights_file, 300)
    todo = (f"Training writes it: run `fine-tune-llm train --config {run.config_file}` again; it resumes from the "
            f"run's last complete checkpoint and saves the adapter anew.")
    for argv in (["evaluate", str(run.path)], ["release", "adapter", str(run.path)],
                 ["release", "merge", str(run.path)]):
        message = one_error_line(argv, capsys)
        assert message.startswith(f"{weights_file} cannot be read: it has 300 bytes") and message.endswith(todo), argv
    assert not run.report_json.exists() and not (run.path / "release").exists()


def test_a_garbled_adapter_config_is_named(run, capsys):
    (run.adapter_dir / "adapter_config.json").write_text('{"peft_type": "LO')
    message = one_error_line(["evaluate", str(run.path)], capsys)
    assert message.startswith(f"{run.adapter_dir / 'adapter_config.json'} cannot be read: it is not valid JSON")


def test_a_truncated_sft_adapter_stops_the_preference_stage_before_loading(run):
    from fine_tune_llm.train.preference import load_policy

    cut(run.adapter_dir / "adapter_model.safetensors", 1000)
    with pytest.raises(DamagedFile, match=r"adapter_model.safetensors cannot be read: it has 1,000 bytes"):
        load_policy(run.read_config(), run)


@pytest.mark.parametrize("garble", ['{"format": 1, "source": "x", "spl', "[1, 2]",
                                    '{"format": 1, "source": "x", "splits": {"test": {"rows": [1, 2]}}}', "\x00\xff"])
def test_a_garbled_splits_file_is_named_with_what_to_do(run, capsys, garble):
    run.splits_file.write_bytes(garble.encode("latin-1"))
    message = one_error_line(["evaluate", str(run.path)], capsys)
    assert message.startswith(f"{run.splits_file}: the run's saved split cannot be read: ")
    assert message.endswith(f"Training writes it: train the run again from the start (`fine-tune-llm train "
                            f"--config {run.config_file} --no-resume`), or train into another --output-dir.")


def test_a_garbled_config_is_named_and_the_adapter_copy_offered(run, capsys):
    run.config_file.write_text("base_model: tiny-gemma\nlora_r: [16\n")  # cut short inside a list
    message = one_error_line(["evaluate", str(run.path)], capsys)
    assert message.startswith(f"{run.config_file}: not valid YAML (")
    assert message.endswith(f"the file is garbled or cut short. The adapter keeps a copy of it: "
                            f"`cp {run.adapter_dir / 'training_config.yaml'} {run.config_file}`.")
    (run.adapter_dir / "training_config.yaml").unlink()
    run.config_file.write_text("- a list\n- not options\n")
    with pytest.raises(DamagedFile, match=r"config.yaml: expected a mapping of option: value: the file is garbled "
                                          r"or cut short. Training writes it: train this run again with --no-resume"):
        run.read_config_values()  # what a resumed training compares its options with


def test_truncated_base_model_weights_are_named(tmp_path):
    from fine_tune_llm.model.loading import load_model
    from fine_tune_llm.model.tiny import tiny_model_dir

    model_dir = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir(), model_dir)
    cut(model_dir / "model.safetensors", 5000)
    cfg = make_config("tiny", base_model=str(model_dir))
    with pytest.raises(DamagedFile, match=rf"^{model_dir}/model.safetensors cannot be read: it has 5,000 bytes, its "
                                          r"header describes [\d,]+: it was cut short. Copy or download the model "
                                          r"again.$"):
        load_model(cfg)


def test_a_truncated_model_in_the_hub_cache_is_named(tmp_path, monkeypatch):
    """transformers' own error ("Error while deserializing header") names no file: the cached one is found."""
    from fine_tune_llm.model.loading import load_model
    from fine_tune_llm.model.tiny import tiny_model_dir

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cut(snapshot / "model.safetensors", 5000)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with pytest.raises(DamagedFile, match=r"model.safetensors \(someone/tiny's model.safetensors in the Hugging Face "
                                          r"cache\) cannot be read: it has 5,000 bytes.* Delete it"):
        load_model(make_config("tiny", base_model="someone/tiny"))
