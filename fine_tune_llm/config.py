"""The one configuration dataclass, its presets, and how flags and YAML files override it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # --- what to tune -------------------------------------------------------------------------------
    # Name of the preset these values came from; recorded so a run directory says how it was made.
    preset: str = "gemma-2b-it"
    # The worked example: Gemma's 2B instruction model is small enough for one T4 in 4-bit, and already
    # chats, so the adapter only has to move its tone, not teach it to converse.
    base_model: str = "google/gemma-2b-it"
    # A .gguf file inside base_model (a directory) when the weights come as GGUF; None for safetensors.
    gguf_file: str | None = None
    # gemma-2b-it is gated on the Hub and its 4-bit kernels are fast only on CUDA: say so up front
    # instead of failing half an hour into a CPU run.
    requires_cuda: bool = True
    # Pickled .bin checkpoints can run code on load; only safetensors unless the user opts in.
    allow_pickle: bool = False
    # Remote code runs arbitrary Python from a Hub repo; no model we use needs it.
    trust_remote_code: bool = False

    # --- data ---------------------------------------------------------------------------------------
    # The psychology preference set: response_j (empathetic) is trained on, response_k kept for eval.
    dataset: str = "jkhedri/psychology-dataset"
    # Test mode: keep only the first N rows after the seeded shuffle (None = all rows).
    data_samples: int | None = None
    # 10% / 10% of distinct questions leaves ~1,000 rows each for stable eval loss and preference accuracy.
    val_fraction: float = 0.1
    # The test split is never trained on nor used for model selection: the before/after report uses it.
    test_fraction: float = 0.1
    # Gemma's template refuses a system role, so a system prompt is folded into the first user turn.
    system_prompt: str | None = None
    # The real answers average ~270 characters (~70 tokens); 512 tokens keeps >99% of rows whole.
    max_length: int = 512

    # --- quantization and LoRA ----------------------------------------------------------------------
    # QLoRA: NF4 with double quantization stores 2B weights in ~1.5 GB; "8bit" and "none" for ablations.
    quantization: str = "4bit"
    # r=16 is the QLoRA paper's sweet spot for 2B-7B models; alpha=2r keeps the update scale at 2.
    lora_r: int = 16
    # alpha = 2r: the LoRA update is scaled by alpha/r = 2, the common QLoRA setting.
    lora_alpha: int = 32
    # Light regularisation for a ~8k-row dataset; 0 on CPU where dropout masks dominate step time.
    lora_dropout: float = 0.05
    # Every linear projection: the QLoRA paper found attention-only LoRA loses quality.
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))

    # --- optimisation -------------------------------------------------------------------------------
    # 2e-4 is the QLoRA paper's rate for small models; LoRA tolerates 10x a full fine-tune's rate.
    learning_rate: float = 2e-4
    # One epoch: the answers are formulaic, and a second epoch mostly memorises them.
    num_epochs: float = 1.0
    # -1 = run the epochs; a positive number caps steps (tests, demos, benchmarks).
    max_steps: int = -1
    # 4 x 4 = 16 sequences per optimizer step fits a T4's 16 GB with gradient checkpointing.
    batch_size: int = 4
    # Accumulate to 16 sequences per update without the memory of batch 16.
    grad_accum: int = 4
    # A short warm-up keeps the first updates of freshly initialised LoRA B matrices small.
    warmup_ratio: float = 0.03
    # Cosine decay ends near zero, so the last steps polish rather than jump.
    lr_scheduler: str = "cosine"
    # Clipping at 1.0 is the Hugging Face default and guards against a single long-answer spike.
    max_grad_norm: float = 1.0
    # paged 8-bit AdamW is QLoRA's optimizer: optimizer state stays small and spills to CPU on spikes.
    optim: str = "paged_adamw_8bit"
    # auto: bf16 on GPUs with bf16 tensor cores (sm_80+) and on CPU (AMX bf16 matmuls run 3-4x faster than
    # fp32), fp16 with fp32 LoRA weights on older GPUs (T4), where bf16 is only emulated.
    dtype: str = "auto"
    # Trades ~30% speed for activation memory; needed for batch 4 x 512 on a 16 GB GPU.
    gradient_checkpointing: bool = True
    # Concatenate examples without padding (position ids keep them apart): no compute spent on padding.
    padding_free: bool = True
    # "sdpa" is fastest on GPU; eager is faster on CPU for short sequences (see benchmarks/).
    attn_implementation: str = "sdpa"
    # Where the loss's LM head runs. "answer-logits": only at trained (answer) positions, chunked fp32
    # cross-entropy (fast_loss.py); "trl": TRL's fused head; "auto": TRL's where it runs in Triton (CUDA/XPU,
    # already answer-only there), answer-logits elsewhere. On CPU TRL's head scores every position and adds
    # full-vocabulary entropy: answer-logits made steps 3.7x faster, same loss (benchmarks/train_throughput.py).
    loss_impl: str = "auto"
    # peft's prepare_model_for_kbit_training upcasts every frozen non-4-bit weight (embeddings = the tied LM
    # head, norms) to fp32, so each step re-casts them to bf16: false keeps them in bf16 (bf16 compute only;
    # fp16 keeps the upcast for range). Measured on CPU: 1.1-1.2x faster, 0.55 GB less peak memory, same loss.
    upcast_frozen: bool = False

    # --- logging, evaluation, checkpoints -----------------------------------------------------------
    # ~600 optimizer steps per epoch on the full data: 10 / 50 gives smooth curves and 12 evals.
    logging_steps: int = 10
    # Evaluate as often as we checkpoint, so each checkpoint has an eval loss.
    eval_steps: int = 50
    # A checkpoint every 50 steps (~5 min on a T4) bounds what a crash can cost.
    save_steps: int = 50
    # Keep a few checkpoints: enough to fall back past a corrupt one, not enough to fill a disk.
    save_total_limit: int = 3
    # One seed drives shuffling, the split, LoRA init and dropout: same seed, same run.
    seed: int = 42
    # The run directory: config, logs, checkpoints, adapter and report all live here.
    output_dir: str = "runs/gemma-2b-it-psych"
    # Where TensorBoard scalars are exported as CSV, shared by all runs so they compare over time.
    metrics_dir: str = "metrics"
    # Where loss plots go (one PNG per run).
    imgs_dir: str = "imgs"

    @property
    def run_name(self) -> str:
        return Path(self.output_dir).name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


PRESETS: dict[str, dict[str, Any]] = {
    "gemma-2b-it": {},
    # A real chat model that trains on a CPU in minutes: for checking the recipe before renting a GPU.
    "smollm2-135m": dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        requires_cuda=False,
        quantization="4bit",
        optim="adamw_torch",
        lora_dropout=0.0,
        gradient_checkpointing=False,
        attn_implementation="eager",
        batch_size=8,
        grad_accum=1,
        max_length=384,
        output_dir="runs/smollm2-135m-psych",
    ),
    # Offline: a tiny Gemma built from a config plus the sample data shipped in the package.
    "tiny": dict(
        base_model="tiny-gemma",
        dataset="sample",
        requires_cuda=False,
        quantization="4bit",
        optim="adamw_torch",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        learning_rate=3e-3,
        batch_size=8,
        grad_accum=1,
        max_length=256,
        max_steps=30,
        warmup_ratio=0.0,
        logging_steps=2,
        eval_steps=10,
        save_steps=10,
        gradient_checkpointing=False,
        attn_implementation="eager",
        output_dir="runs/tiny-psych",
    ),
}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def coerce(name: str, value: Any) -> Any:
    """Turn a CLI/YAML value into the field's type; errors name the option."""
    ftype = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    if value is None or not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and "None" in str(ftype):
        return None
    try:
        if "list" in str(ftype):
            return [v.strip() for v in value.split(",") if v.strip()]
        if "bool" in str(ftype):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in str(ftype):
            return int(value)
        if "float" in str(ftype):
            return float(value)
    except ValueError:
        raise ConfigError(f"option {name!r}: cannot read {value!r} as {ftype}") from None
    return value


def make_config(preset: str = "gemma-2b-it", yaml_file: str | Path | None = None,
                **overrides: Any) -> TrainConfig:
    """Preset, then YAML file, then explicit overrides (CLI flags or notebook parameters)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    if yaml_file is not None:
        path = Path(yaml_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        if "preset" in loaded and loaded["preset"] != preset:
            return make_config(loaded["preset"], yaml_file, **overrides)
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}; valid options: {', '.join(field_names())}")
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.quantization in ("4bit", "8bit", "none"), "quantization", "one of 4bit, 8bit, none"),
        (cfg.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype",
         "one of auto, bfloat16, float16, float32"),
        (cfg.lora_r > 0, "lora_r", "a positive integer"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout", "in [0, 1)"),
        (cfg.max_length >= 16, "max_length", "at least 16"),
        (cfg.batch_size > 0 and cfg.grad_accum > 0, "batch_size/grad_accum", "positive"),
        (cfg.data_samples is None or cfg.data_samples > 0, "data_samples", "positive or None"),
        (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1
         and cfg.val_fraction + cfg.test_fraction < 1, "val_fraction/test_fraction", "fractions summing below 1"),
        (cfg.learning_rate > 0, "learning_rate", "positive"),
        (cfg.attn_implementation in ("eager", "sdpa", "flash_attention_2"), "attn_implementation",
         "one of eager, sdpa, flash_attention_2"),
        (cfg.loss_impl in ("auto", "answer-logits", "trl"), "loss_impl", "one of auto, answer-logits, trl"),
    ]
    for ok, name, want in checks:
        if not ok:
            raise ConfigError(f"option {name!r} must be {want}; got {getattr(cfg, name, None)!r}")


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run wrote (config.yaml), for evaluation and release."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no config.yaml in {run_dir}: is it a run directory made by `fine-tune-llm train`?")
    values = yaml.safe_load(path.read_text())
    return TrainConfig(**{k: v for k, v in values.items() if k in field_names()})


def describe(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
