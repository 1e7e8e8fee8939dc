"""The GPU path on the GPUs users have (issue #14), checked on CPU with the CUDA queries patched: precision per
GPU, fp32 LoRA weights for fp16 training, placement per launch mode, the Triton fallback, the environment check."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from fine_tune_llm.config import make_config
from fine_tune_llm.errors import EnvironmentNotReady
from fine_tune_llm.model import hardware
from fine_tune_llm.model import loading as modeling
from fine_tune_llm.train import answer_loss as fast_loss

T4, A100, H100 = ("Tesla T4", 7, 5), ("NVIDIA A100-SXM4-40GB", 8, 0), ("NVIDIA H100 80GB HBM3", 9, 0)


@pytest.fixture
def gpu(monkeypatch):
    """Make torch report `count` GPUs of one kind; torch's own is_bf16_supported runs on the patched properties."""
    def install(kind=T4, count=1, total=16 * 2**30):
        name, major, minor = kind
        props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=total)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        # A bf16 tensor can be made on any CUDA GPU: torch then emulates bf16 (the trap on a T4).
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
        return props
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hardware, "_warned", set())  # each test sees its own once-only warnings
    return install


# --- precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "dtype", "compute"), [
    ("cpu-bf16", "bfloat16", torch.bfloat16),  # a CPU with avx512_bf16 or AMX: bf16, as before
    ("cpu-avx2", "float32", torch.float32),  # no native bf16: emulated bf16 is ~30x slower than fp32
    (T4, "float16", torch.float16),
    (A100, "bfloat16", torch.bfloat16),
    (H100, "bfloat16", torch.bfloat16),
])
def test_auto_precision_per_gpu(gpu, monkeypatch, kind, dtype, compute):
    if isinstance(kind, str):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: kind == "cpu-bf16")
    else:
        gpu(kind)
    cfg = make_config("gemma-2b-it")
    assert cfg.dtype == "auto"
    p = hardware.precision(cfg)
    assert (p.dtype, p.warning) == (dtype, None)
    assert modeling.quantization_config(cfg).bnb_4bit_compute_dtype == compute
    assert modeling.torch_dtype(cfg) == compute
    assert (p.bf16, p.fp16) == (dtype == "bfloat16", dtype == "float16")
    # fp16 and fp32 keep fp32 LoRA weights (the GradScaler needs them); bf16 keeps TRL's bf16
    assert p.trainable_dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(hardware, "_warn_once", lambda message: hardware.log.warning(message))
    with caplog.at_level("WARNING"):
        p = hardware.precision(make_config("gemma-2b-it", dtype="bfloat16"))
    assert p.dtype == "bfloat16" and "avx512_bf16" in p.warning and "float32" in p.warning
    assert any("emulates bf16" in r.getMessage() for r in caplog.records)


def test_cpu_bf16_probe_agrees_with_the_kernels_cpu_flags():
    """torch's probes against an independent source: the flags the kernel lists for this CPU (what lscpu shows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.MULTILINE).group(1).split())
    assert hardware.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_t4_reports_bf16_support_through_emulation_yet_auto_picks_fp16(gpu):
    gpu(T4)
    assert torch.cuda.is_bf16_supported()  # what TrainingArguments' bf16 check sees: it would let bf16 run
    assert not torch.cuda.is_bf16_supported(including_emulation=False)
    assert hardware.precision(make_config("gemma-2b-it")).dtype == "float16"


def test_explicit_dtype_wins_and_emulated_bf16_warns(gpu, caplog):
    gpu(T4)
    with caplog.at_level(logging.WARNING, logger="fine_tune_llm.model.hardware"):
        p = hardware.precision(make_config("gemma-2b-it", dtype="bfloat16"))
    assert p.dtype == "bfloat16" and p.bf16 and not p.fp16
    assert "Tesla T4 (sm_75)" in p.warning and "emulates bf16" in p.warning and "float16" in p.warning
    assert any("emulates bf16" in r.getMessage() for r in caplog.records)
    fp32 = hardware.precision(make_config("gemma-2b-it", dtype="float32"))
    assert (fp32.dtype, fp32.bf16, fp32.fp16, fp32.warning) == ("float32", False, False, None)
    gpu(H100)
    fp16 = hardware.precision(make_config("gemma-2b-it", dtype="float16"))
    assert (fp16.dtype, fp16.fp16, fp16.warning) == ("float16", True, None)


def test_resolved_config_records_the_dtype_training_used(gpu):
    gpu(T4)
    assert hardware.resolved(make_config("gemma-2b-it")).dtype == "float16"


# --- fp16: LoRA weights the GradScaler can unscale --------------------------------------------------------------

def _build(cfg):
    from fine_tune_llm.run import RunDir
    from fine_tune_llm.train.sft import build_trainer, prepare_data

    tokenizer = modeling.load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    model = modeling.add_lora(modeling.load_model(cfg), cfg)
    return build_trainer(cfg, model, tokenizer, data.tokenized["train"], data.tokenized["validation"],
                         RunDir.of(cfg.output_dir))


def _trainable(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}


def test_fp16_training_keeps_lora_weights_fp32_after_trl_casts_them(tmp_path, monkeypatch):
    t4_fp16 = hardware.Precision("float16", "Tesla T4 (sm_75)", "auto: patched T4")
    monkeypatch.setattr(hardware, "precision", lambda cfg: t4_fp16)
    cfg = tiny_config(tmp_path, max_steps=2)
    trainer = _build(cfg)
    assert trainer.args.fp16 and not trainer.args.bf16
    modeling.restore_trainable_dtype(trainer.model, cfg)  # the line build_trainer runs after TRL's __init__
    dtypes = _trainable(trainer.model)
    assert len(dtypes) == 2 * 7 * 2 and set(dtypes.values()) == {torch.float32}
    # What the fp16 GradScaler does at every step: unscale the gradients of exactly these weights.
    batch = next(iter(trainer.get_train_dataloader()))
    scaler, optimizer = torch.amp.GradScaler("cpu"), torch.optim.AdamW(trainer.model.parameters())
    scaler.scale(trainer.compute_loss(trainer.model, batch)).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_trl_casts_lora_to_bf16_and_the_restore_undoes_it_only_for_fp16_and_fp32(tmp_path, monkeypatch):
    """Guards the upstream behaviour the restore exists for (trl/trainer/sft_trainer.py, QLoRA -> bf16), and that
    build_trainer applies the restore."""
    from fine_tune_llm.train import sft as training

    cfg = tiny_config(tmp_path, dtype="float32", max_steps=1)
    assert set(_trainable(_build(cfg).model).values()) == {torch.float32}  # build_trainer restored them
    monkeypatch.setattr(training, "restore_trainable_dtype", lambda model, cfg: 0)
    trainer = _build(cfg)
    assert set(_trainable(trainer.model).values()) == {torch.bfloat16}  # what TRL alone leaves
    assert modeling.restore_trainable_dtype(trainer.model, cfg) == 2 * 7 * 2
    bf16 = tiny_config(tmp_path, "bf16")
    assert modeling.restore_trainable_dtype(trainer.model, bf16) == 0  # bf16 runs keep TRL's bf16


def test_fp32_tiny_run_through_the_restored_path_trains(tmp_path):
    cfg = tiny_config(tmp_path, dtype="float32", max_steps=10, logging_steps=1, eval_steps=1000, save_steps=1000)
    trainer = _build(cfg)
    modeling.restore_trainable_dtype(trainer.model, cfg)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert set(_trainable(trainer.model).values()) == {torch.float32}
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


# --- placement --------------------------------------------------------------------------------------------------

def test_single_process_loads_on_gpu_0(gpu):
    gpu(T4)
    assert hardware.launch_mode() == "single" and hardware.device_map() == {"": 0}
    hardware.check_placement()  # one GPU visible: fine


def test_ddp_rank_1_of_2_loads_on_its_local_gpu(gpu, monkeypatch):
    gpu(A100, count=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hardware.launch_mode() == "ddp" and hardware.device_map() == {"": 1}
    hardware.check_placement()  # a launcher: two GPUs are fine


def test_fsdp_rank_1_of_2_starts_the_process_group_then_loads_on_its_gpu(gpu, monkeypatch):
    gpu(A100, count=2)
    for name, value in {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(hardware, "start_process_group", lambda: started.append(True))
    assert hardware.launch_mode() == "fsdp" and hardware.device_map() == {"": 1} and started == [True]


@pytest.mark.parametrize(("kind", "dtype", "storage", "compute"), [
    (A100, "auto", torch.bfloat16, torch.bfloat16),
    (T4, "auto", torch.float32, torch.float16),  # fp16 compute, fp32 storage: LoRA weights are fp32 there
    (A100, "float32", torch.float32, torch.float32),
])
def test_fsdp_keeps_every_float_tensor_of_a_block_in_one_dtype(gpu, monkeypatch, kind, dtype, storage, compute):
    gpu(kind)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = make_config("gemma-2b-it", dtype=dtype, upcast_frozen=True)
    q = modeling.quantization_config(cfg)
    assert q.bnb_4bit_quant_storage == storage == modeling.frozen_dtype(cfg)
    assert hardware.precision(cfg).trainable_dtype == storage
    assert q.bnb_4bit_compute_dtype == compute


def test_two_gpus_without_a_launcher_stop_with_one_message(gpu):
    gpu(A100, count=2)
    with pytest.raises(EnvironmentNotReady) as err:
        hardware.check_environment(make_config("tiny"))
    msg = str(err.value)
    assert msg.startswith("2 GPUs are visible to one training process")
    assert "CUDA_VISIBLE_DEVICES=0" in msg and "accelerate launch" in msg and "multi_gpu_ddp.yaml" in msg
    hardware.check_environment(make_config("tiny"), purpose="evaluate")  # evaluation uses GPU 0: fine


# --- loss fallback ----------------------------------------------------------------------------------------------

@pytest.fixture
def triton_on_cuda(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_triton_available", lambda: True)
    fast_loss.triton_ready.cache_clear()
    yield
    fast_loss.triton_ready.cache_clear()


def test_auto_without_a_c_compiler_picks_the_answer_only_loss(triton_on_cuda, monkeypatch, caplog):
    import shutil

    monkeypatch.delenv("CC", raising=False)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name in ("gcc", "clang") else
                        real_which(name, *a, **k))
    assert "C compiler" in fast_loss.triton_build_missing()
    with caplog.at_level(logging.INFO, logger="fine_tune_llm.train.answer_loss"):
        assert fast_loss.wanted("auto") is True  # the test launch fails too: no CUDA device really exists
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "loss: answer-only logits" in message and "C compiler" in message and "test launch failed" in message


def test_auto_uses_trl_triton_head_where_triton_can_build(triton_on_cuda, monkeypatch):
    monkeypatch.setattr(fast_loss, "triton_build_missing", list)
    assert fast_loss.choose("auto") == (False, "C compiler and Python headers present")
    assert fast_loss.wanted("answer-logits") is True and fast_loss.wanted("trl") is False


# --- environment check ------------------------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def failing_init(message):
        def init():
            raise RuntimeError(message)
        monkeypatch.setattr(torch.cuda, "init", init)
    return failing_init


def test_evaluate_on_a_gpu_preset_without_cuda_stops_before_loading_anything(no_cuda, monkeypatch):
    no_cuda("Found no NVIDIA driver on your system.")
    monkeypatch.setattr(hardware, "driver_installed", lambda: False)
    cfg = make_config("gemma-2b-it")  # what evaluate reads back from a GPU run's config.yaml
    with pytest.raises(EnvironmentNotReady) as err:
        hardware.check_environment(cfg, purpose="evaluate")
    assert str(err.value).startswith("preset 'gemma-2b-it' (google/gemma-2b-it) needs a CUDA GPU: none is visible")
    assert "--preset tiny" in str(err.value)


def test_a_driver_too_old_for_this_cuda_is_named_as_the_cause(no_cuda, monkeypatch):
    no_cuda("The NVIDIA driver on your system is too old (found version 12040). Please update your GPU driver")
    monkeypatch.setattr(hardware, "driver_installed", lambda: True)  # nvidia-smi is there
    with pytest.raises(EnvironmentNotReady) as err:
        hardware.check_environment(make_config("gemma-2b-it"), purpose="release")
    msg = str(err.value)
    assert "an NVIDIA driver is installed but CUDA failed to start" in msg and "found version 12040" in msg
    assert "built for CUDA 13.0, which needs driver 580 or newer" in msg and "none is visible" not in msg


def test_hidden_gpus_and_cpu_only_builds_are_named(no_cuda, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.no_cuda_reason() == "CUDA_VISIBLE_DEVICES='' hides every GPU"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in hardware.no_cuda_reason()


def test_cpu_presets_pass_the_check_without_cuda(no_cuda):
    hardware.check_environment(make_config("tiny"))
