"""Tokenizer and model loading: quantization, the CPU 4-bit guard, LoRA."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError, DamagedFile
from ..files import cache_root, json_problem, safetensors_problem
from . import hardware
from .hardware import OFFLINE_HINT, check_environment, device_map, is_local  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


def model_source(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """Where the weights are: the tiny build, a local directory/.gguf file, or a Hub id."""
    if cfg.base_model == "tiny-gemma":
        from .tiny import tiny_model_dir

        return str(tiny_model_dir()), {}
    path = Path(cfg.base_model).expanduser()
    if path.suffix == ".gguf":
        return gguf_as_safetensors(path.parent, path.name), {}
    if cfg.gguf_file:
        return gguf_as_safetensors(path, cfg.gguf_file), {}
    return cfg.base_model, {}


def gguf_as_safetensors(folder: Path, name: str) -> str:
    """A GGUF model rewritten once as a bf16 safetensors folder (cached), so bitsandbytes can quantize it.

    transformers dequantizes GGUF weights on load but refuses a quantization_config for them; going through
    a plain checkpoint gives the same 4-bit model as any Hub safetensors model.
    """
    import hashlib
    import shutil
    import tempfile

    source = Path(folder).expanduser() / name
    if not source.is_file():
        raise ConfigError(f"GGUF file not found: {source}")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / f"gguf-{source.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a bf16 safetensors checkpoint in %s (once)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        AutoTokenizer.from_pretrained(source.parent, gguf_file=name).save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=name, dtype=torch.bfloat16)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its weights into a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _refuse_pickle(source: str, cfg: TrainConfig, kwargs: dict[str, Any]) -> None:
    path = Path(source)
    if cfg.allow_pickle or "gguf_file" in kwargs or not path.is_dir():
        return
    if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise ConfigError(f"{source} holds only pickled .bin weights, which can run code when loaded; convert "
                          f"them to safetensors or pass --allow-pickle true if you trust the source")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_folder(folder: str | Path, hint: str) -> Path:
    """Refuse an adapter folder with a file missing, cut short or garbled, naming the file and what to do (`hint`),
    before any model loads (PEFT's own error names no file)."""
    folder = Path(folder)
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"no adapter in {folder} ({name} missing): did training finish?")
    for name, problem in zip(ADAPTER_FILES, (json_problem, safetensors_problem)):
        why = problem(folder / name)
        if why:
            raise DamagedFile(f"{folder / name} cannot be read: {why}. {hint}".rstrip())
    return folder


def check_model_files(source: str) -> None:
    """A local model folder's weights must be whole: a file cut short (a copy or download that did not finish) is
    named here, where transformers would fail with a header error naming no file."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for weights in sorted(folder.glob("*.safetensors")):
        why = safetensors_problem(weights)
        if why:
            built = folder.resolve().is_relative_to(cache_root().resolve())
            todo = (f"This tool built it: delete {folder} and the next run builds it again." if built else
                    "Copy or download the model again.")
            raise DamagedFile(f"{weights} cannot be read: {why}. {todo}")


def damaged_hub_file(source: str, exc: BaseException) -> DamagedFile | None:
    """The cached Hub file behind a weights error that names no file (safetensors' "Error while deserializing
    header"), or None when the error is another one."""
    if "deserializing header" not in str(exc):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(source, "model.safetensors.index.json")
        names = (sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if isinstance(index, str)
                 else ["model.safetensors"])
        for name in names:
            cached = try_to_load_from_cache(source, name)
            why = safetensors_problem(cached) if isinstance(cached, str) else None
            if why:
                return DamagedFile(f"{cached} ({source}'s {name} in the Hugging Face cache) cannot be read: {why}. "
                                   f"Delete it and the file it links to ({Path(cached).resolve()}), then run again "
                                   f"online: it is downloaded anew.")
    except Exception:  # noqa: BLE001, S110 - no cache to search: the library's own error stands
        pass
    return None


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    source, kwargs = model_source(cfg)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tok.pad_token is None:  # Llama-family GGUF tokenizers ship none; never pad with a token we train on
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"  # training pads right; generation switches to left locally
    if tok.chat_template is None:
        raise ConfigError(f"{cfg.base_model} has no chat template: use an instruction-tuned (chat) model")
    return tok


def torch_dtype(cfg: TrainConfig) -> torch.dtype:
    """The float dtype this run loads and computes in: cfg.dtype, or for `auto` the one this machine runs best."""
    return hardware.precision(cfg).torch_dtype


def quantization_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(cfg),
            # FSDP shards flat parameters of one dtype: under FSDP, store the packed 4-bit weights in the dtype
            # every other float weight of the run has
            # (https://huggingface.co/docs/peft/accelerate/fsdp#use-peft-qlora-and-fsdp).
            bnb_4bit_quant_storage=hardware.precision(cfg).fsdp_dtype if hardware.fsdp() else torch.uint8)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(cfg: TrainConfig, quantize: bool = True, dtype: torch.dtype | None = None):
    """The base model, 4-bit (or as configured), frozen, ready for LoRA or evaluation."""
    from transformers import AutoModelForCausalLM

    source, kwargs = model_source(cfg)
    _refuse_pickle(source, cfg, kwargs)
    check_model_files(source)
    qconfig = quantization_config(cfg) if quantize else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or torch_dtype(cfg), quantization_config=qconfig, device_map=hardware.device_map(),
            attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if ("gguf_file" in kwargs or cfg.allow_pickle) else True, **kwargs)
    except Exception as exc:
        damaged = damaged_hub_file(source, exc)
        if damaged is None:
            raise
        raise damaged from None
    guard_cpu_4bit(model)
    return model


def guard_cpu_4bit(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' CPU 4-bit layers on the autograd-safe path.

    On AVX512-BF16 CPUs the first no-grad forward (an eval pass) repacks Linear4bit weights, and later
    training passes go through gemv_4bit, which has no autograd kernel: LoRA gradients come out silently wrong
    (bitsandbytes 0.50.2 warns "an autograd kernel was not registered"). Disabling the repack avoids it.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def lora_config(cfg: TrainConfig, num_layers: int | None = None):
    """The adapter's LoraConfig; with cfg.lora_layers, only the top blocks of a model with num_layers get one."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                      layers_to_transform=adapted_layers(cfg, num_layers))


def adapted_layers(cfg: TrainConfig, num_layers: int | None) -> list[int] | None:
    """The indices of the top cfg.lora_layers blocks (None: every block)."""
    if cfg.lora_layers is None or num_layers is None or cfg.lora_layers >= num_layers:
        return None
    return list(range(num_layers - cfg.lora_layers, num_layers))


def num_hidden_layers(model) -> int | None:
    config = model.config
    config = getattr(config, "text_config", None) or config  # multimodal configs keep the LM's shape inside
    return getattr(config, "num_hidden_layers", None)


def prepare_for_training(model, cfg: TrainConfig):
    """peft's k-bit preparation (input gradients, checkpointing), frozen weights kept in the dtype they compute in."""
    from peft import prepare_model_for_kbit_training

    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        frozen = frozen_dtype(cfg)
        if frozen is not None:
            keep_frozen_in(model, frozen)
    return model


def add_lora(model, cfg: TrainConfig):
    """Prepare a k-bit model for training and wrap it with LoRA adapters on the target projections of the adapted
    blocks (every block unless cfg.lora_layers)."""
    from peft import get_peft_model
    from transformers import set_seed

    # LoRA's A matrices are drawn here: from the run's seed, whoever calls. train() seeds too, but a notebook wraps
    # the model before calling train(), and its adapter must start where the same run from a terminal starts.
    set_seed(cfg.seed)
    model = get_peft_model(prepare_for_training(model, cfg), lora_config(cfg, num_hidden_layers(model)))
    guard_cpu_4bit(model)
    trainable, total = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def frozen_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype of the frozen float weights (embeddings, norms) after peft's fp32 upcast, None to keep fp32:
    bf16 runs keep them in bf16 unless cfg.upcast_frozen; under FSDP they join the run's one FSDP dtype."""
    p = hardware.precision(cfg)
    if hardware.fsdp():
        return p.fsdp_dtype
    return torch.bfloat16 if p.dtype == "bfloat16" and not cfg.upcast_frozen else None


def restore_trainable_dtype(model: torch.nn.Module, cfg: TrainConfig) -> int:
    """Call once TRL's SFTTrainer is built, before it trains: give the LoRA weights back the run's trainable dtype.

    TRL 1.16 casts every trainable parameter of a quantized model to bf16 in SFTTrainer.__init__
    (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16"; it would pass
    autocast_adapter_dtype=False instead, which peft does not support for quantized models:
    https://github.com/huggingface/peft/issues/2889). fp16 training then dies at the first optimizer step: the
    GradScaler cannot unscale bf16 gradients. fp16 and fp32 runs get fp32 LoRA weights back; bf16 runs keep bf16.
    The optimizer is created when training starts, so it sees the restored weights. Returns how many were cast."""
    target = hardware.precision(cfg).trainable_dtype
    if target == torch.bfloat16:
        return 0
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.to(target)
            n += 1
    return n


def keep_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen float weights (bf16 -> fp32 -> bf16 is
    exact). Those weights are the embeddings (Gemma's tied LM head: 256k x hidden) and the norms; in fp32 each
    step casts them back to bf16 for bf16 matmuls, and they hold twice the memory (gemma-2b-it: a gigabyte more).
    Gemma's norms compute in fp32 internally either way. Keeping them in bf16 makes CPU steps faster with less peak
    memory (docs/results.md#gemma-shaped-model, row ours+fp32-frozen)."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(dtype)
            n += 1
    return n


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Trainable and total parameters; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT knows each 4-bit storage dtype's packing
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def memory_footprint_mb(model: torch.nn.Module) -> float:
    return model.get_memory_footprint() / 2**20


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
