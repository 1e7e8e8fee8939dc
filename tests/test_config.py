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

    from fine_tune_llm.cli import build_parser

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
    from fine_tune_llm.cli import build_parser, config_from_args

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
