"""Presets, YAML and flag overrides, and errors that name the option."""

import pytest

from fine_tune_llm.config import PRESETS, TrainConfig, make_config
from fine_tune_llm.errors import ConfigError


def test_default_is_gemma_2b_it_in_4bit():
    cfg = make_config()
    assert cfg.base_model == "google/gemma-2b-it" and cfg.quantization == "4bit"
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert set(PRESETS) >= {"gemma-2b-it", "smollm2-135m", "tiny"}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nlearning_rate: 0.001\nlora_r: 4\n")
    cfg = make_config("gemma-2b-it", path, lora_r="12", target_modules="q_proj,v_proj", data_samples="none")
    assert cfg.preset == "tiny" and cfg.base_model == "tiny-gemma"
    assert cfg.learning_rate == 0.001 and cfg.lora_r == 12 and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.data_samples is None


def test_resolved_config_round_trips(tmp_path):
    from fine_tune_llm.run import RunDir

    cfg = make_config("tiny", output_dir=str(tmp_path))
    RunDir.of(tmp_path).write_config(cfg)
    assert RunDir.of(tmp_path).read_config() == cfg


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "gemma-7b"}, "unknown preset 'gemma-7b'; choose one of: gemma-2b-it, smollm2-135m, tiny"),
    ({"quantization": "3bit"}, "option 'quantization' must be one of 4bit, 8bit, none"),
    ({"lora_r": "many"}, "option 'lora_r': cannot read 'many'"),
    ({"lora_rank": 8}, "unknown option(s): lora_rank"),
])
def test_bad_options_are_named(kwargs, message):
    preset = kwargs.pop("preset", "tiny")
    with pytest.raises(ConfigError) as err:
        make_config(preset, **kwargs)
    assert message in str(err.value)


def test_every_field_has_a_reason_in_help():
    import argparse

    from fine_tune_llm.cli.commands import build_parser

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = train.format_help()
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name == "preset":
            assert "--preset" in text
            continue
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        reason = f.metadata.get("help", "")
        assert len(reason.split()) >= 5, f"field {f.name} has no reason for its default"
        shown = next(a for a in train._actions if a.dest == f.name and not a.option_strings[0].startswith("--no"))
        assert shown.help.startswith(reason.replace("%", "%%")) and "default:" in shown.help


def test_flags_override_the_preset_and_bad_values_name_the_option(capsys):
    from fine_tune_llm.cli.commands import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--preset", "tiny", "--learning-rate", "1e-4", "--no-padding-free",
                                      "--target-modules", "q_proj", "v_proj", "--data-samples", "none"])
    cfg = config_from_args(args)
    assert (cfg.learning_rate, cfg.padding_free, cfg.target_modules, cfg.data_samples) == (
        1e-4, False, ["q_proj", "v_proj"], None)
    assert cfg.lora_r == PRESETS["tiny"]["lora_r"]  # untouched options keep the preset's value
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lora-r", "many"])
    assert "option 'lora_r': cannot read 'many' as int" in capsys.readouterr().err


def test_pair_checks_name_the_values():
    with pytest.raises(ConfigError, match=r"got val_fraction=0.6, test_fraction=0.5"):
        make_config("tiny", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ConfigError, match=r"'grad_accum' must be positive; got grad_accum=0"):
        make_config("tiny", grad_accum=0)


# --- presets are YAML files a user can copy ---------------------------------------------------------------------

def test_each_preset_file_opens_with_its_command_and_gives_a_reason_per_value():
    from fine_tune_llm.config import presets_dir

    for name in PRESETS:
        text = (presets_dir() / f"{name}.yaml").read_text()
        assert text.startswith("#") and f"--preset {name}" in text.split("\n\n")[0], name
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{name}.yaml: no reason for {line.strip()!r}"


def test_the_gemma_preset_file_spells_out_the_dataclass_defaults():
    from fine_tune_llm.config import field_defaults

    defaults = field_defaults()
    written = PRESETS["gemma-2b-it"]
    assert len(written) >= 10
    assert {k: v for k, v in written.items()} == {k: defaults[k] for k in written}


def test_an_edited_preset_file_changes_the_preset(tmp_path, monkeypatch):
    import shutil

    from fine_tune_llm.config import presets_dir

    copy = tmp_path / "presets"
    shutil.copytree(presets_dir(), copy)
    text = (copy / "tiny.yaml").read_text()
    (copy / "tiny.yaml").write_text(text.replace("lora_r: 8 ", "lora_r: 5 "))
    (copy / "mine.yaml").write_text("# fine-tune-llm train --preset mine\nbase_model: tiny-gemma  # mine\n")
    monkeypatch.setenv("FINE_TUNE_LLM_PRESETS", str(copy))
    assert make_config("tiny").lora_r == 5
    assert "mine" in PRESETS and make_config("mine").base_model == "tiny-gemma"


def test_a_copied_preset_file_works_as_a_config_file(tmp_path):
    from fine_tune_llm.cli.commands import build_parser, config_from_args
    from fine_tune_llm.config import presets_dir

    mine = tmp_path / "my-smollm2.yaml"
    mine.write_text((presets_dir() / "smollm2-135m.yaml").read_text().replace("lora_layers: 15 ", "lora_layers: 7 "))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(mine), "--learning-rate", "1e-4"]))
    assert (cfg.base_model, cfg.lora_layers, cfg.learning_rate) == ("HuggingFaceTB/SmolLM2-135M-Instruct", 7, 1e-4)
    assert cfg.batch_size == make_config("smollm2-135m").batch_size


def test_a_preset_files_stage_section_sets_the_preference_stage_defaults():
    base = make_config("tiny").to_dict()
    dpo = make_config(base=base, stage="dpo", sft_run="runs/x")
    assert (dpo.learning_rate, dpo.max_steps) == (PRESETS["tiny"]["dpo"]["learning_rate"], 20)
    gemma = make_config(base=make_config().to_dict(), stage="dpo", sft_run="runs/x")
    assert (gemma.loss_type, gemma.beta, gemma.learning_rate, gemma.max_steps) == ("simpo", 2.0, 7.5e-6, -1)


def test_beta_left_unset_is_the_losss_own_even_when_the_sft_run_recorded_one():
    sft = {**make_config().to_dict(), "loss_type": "sigmoid", "beta": 0.1}  # as a run saved before the default
    assert make_config(base=sft, stage="dpo", sft_run="runs/x").beta == 2.0  # simpo, the stage's default
    assert make_config(base=sft, stage="dpo", sft_run="runs/x", loss_type="sigmoid").beta == 0.1
    assert make_config(base=sft, stage="dpo", sft_run="runs/x", loss_type="ipo", beta=0.5).beta == 0.5


def test_a_bad_preset_or_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        make_config("tiny", bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        make_config("tiny", bad)


def test_help_relies_on_a_private_hfargumentparser_api_that_still_exists():
    """config.add_config_arguments calls HfArgumentParser._parse_dataclass_field (private): pin its behaviour."""
    import argparse
    import copy
    import dataclasses
    import typing

    from transformers import HfArgumentParser

    assert callable(getattr(HfArgumentParser, "_parse_dataclass_field", None))
    parser = argparse.ArgumentParser()
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lora_layers")
    typed = copy.copy(field)
    typed.type = typing.get_type_hints(TrainConfig)["lora_layers"]
    HfArgumentParser._parse_dataclass_field(parser, typed)
    action = parser._actions[-1]
    assert "--lora_layers" in action.option_strings and action.type is int
