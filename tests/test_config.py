"""Presets, YAML and flag overrides, and errors that name the option."""

import pytest

from fine_tune_llm.config import PRESETS, TrainConfig, load_run_config, make_config
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
    cfg = make_config("tiny", output_dir=str(tmp_path))
    cfg.save(tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == cfg


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


def test_every_field_has_a_why_comment():
    import inspect

    from fine_tune_llm import config

    lines = inspect.getsource(config.TrainConfig).splitlines()
    for name in TrainConfig.__dataclass_fields__:
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        j = i - 1
        while lines[j].strip().startswith("#") and "---" not in lines[j]:
            j -= 1
        assert j < i - 1 or "#" in lines[i], f"field {name} has no comment saying why"
