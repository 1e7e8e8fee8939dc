"""The one configuration dataclass, its presets, and how flags and YAML files override it."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def option(default: Any, help: str, factory: bool = False) -> Any:
    """A config field whose help text (why the default is what it is) is what `--help` prints."""
    if factory:
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Every setting of a run. Each field's help says why its default is what it is (`train --help` shows it)."""

    # --- what to tune -------------------------------------------------------------------------------
    preset: str = option("gemma-2b-it", help=(
        "Name of the preset these values came from; recorded so a run directory says how it was made."))
    base_model: str = option("google/gemma-2b-it", help=(
        "The worked example: Gemma's 2B instruction model is small enough for one T4 in 4-bit, and "
        "already chats, so the adapter only has to move its tone, not teach it to converse."))
    gguf_file: str | None = option(None, help=(
        "A .gguf file inside base_model (a directory) when the weights come as GGUF; None for "
        "safetensors."))
    requires_cuda: bool = option(True, help=(
        "gemma-2b-it is gated on the Hub and its 4-bit kernels are fast only on CUDA: say so up front "
        "instead of failing half an hour into a CPU run."))
    allow_pickle: bool = option(False, help=(
        "Pickled .bin checkpoints can run code on load; only safetensors unless the user opts in."))
    trust_remote_code: bool = option(False, help=(
        "Remote code runs arbitrary Python from a Hub repo; no model we use needs it."))

    # --- data ---------------------------------------------------------------------------------------
    dataset: str = option("jkhedri/psychology-dataset", help=(
        "The psychology preference set: response_j (empathetic) is trained on, response_k kept for "
        "eval."))
    data_samples: int | None = option(None, help=(
        "Test mode: keep only the first N rows after the seeded shuffle (None = all rows)."))
    val_fraction: float = option(0.1, help=(
        "10% / 10% of distinct questions leaves ~1,000 rows each for stable eval loss and preference "
        "accuracy."))
    test_fraction: float = option(0.1, help=(
        "The test split is never trained on nor used for model selection: the before/after report "
        "uses it."))
    near_duplicate_threshold: float = option(0.8, help=(
        "Prompts whose word sets overlap this much (Jaccard) share a cluster, kept in one split: the lowest value at "
        "which the psychology data's templated questions do not chain into a cluster larger than its test split "
        "(docs/results.md), so its paraphrases stay on one side."))
    data_format: str = option("auto", help=(
        "auto: read from the columns (messages, conversations, prompt/completion, prompt/chosen/rejected, "
        "question/response_j/response_k, instruction/output; docs/training.md#data-formats), so the same command "
        "takes any of them; name one to insist, and a file without its columns stops naming what is missing."))
    columns: str | None = option(None, help=(
        "Your own column names as FIELD=COLUMN pairs: question=Q,answer=A[,rejected=R][,system=S], or messages=M "
        "(a conversation column); a YAML file may give a mapping. Explicit, not guessed: a file whose columns "
        "match no standard format stops instead of training on the wrong column."))
    train_on: str = option("all", help=(
        "all: the loss covers every assistant turn of a conversation, each being an answer the model should give; "
        "last: only the final one, the earlier turns being context (e.g. answers written by another model)."))
    system_prompt: str | None = option(None, help=(
        "A system message for rows that carry none: kept as a system turn where the chat template has one "
        "(ChatML), folded into the first user turn where it refuses one (Gemma)."))
    max_length: int = option(512, help=(
        "The real answers average ~270 characters (~70 tokens); 512 tokens keeps >99% of rows whole."))

    # --- quantization and LoRA ----------------------------------------------------------------------
    quantization: str = option("4bit", help=(
        "QLoRA: NF4 with double quantization stores a weight in ~4 bits, so 2B weights fit a small GPU; "
        "\"8bit\" and \"none\" for ablations."))
    lora_r: int = option(16, help=(
        "r=16 is the QLoRA paper's sweet spot for 2B-7B models; alpha=2r keeps the update scale at 2."))
    lora_alpha: int = option(32, help=(
        "alpha = 2r: the LoRA update is scaled by alpha/r = 2, the common QLoRA setting."))
    lora_dropout: float = option(0.05, help=(
        "Light regularisation for a ~8k-row dataset; 0 on CPU where dropout masks dominate step time."))
    target_modules: list[str] = option(ALL_LINEAR, factory=True, help=(  # noqa: RUF009 - a fresh list per config
        "Every linear projection: the QLoRA paper found attention-only LoRA loses quality."))
    lora_layers: int | None = option(None, help=(
        "Adapt only the top N transformer blocks (None: all of them). Below the lowest adapted block nothing "
        "needs a gradient, so the backward pass stops there and keeps no activations for those blocks: a CPU "
        "step costs about forward + N/L of the backward, for some perplexity (docs/results.md, \"The CPU "
        "recipe\"). None by default: every block adapted is the best quality."))

    # --- optimisation -------------------------------------------------------------------------------
    learning_rate: float = option(2e-4, help=(
        "2e-4 is the QLoRA paper's rate for small models; LoRA tolerates ten times a full fine-tune's rate."))
    num_epochs: float = option(1.0, help=(
        "One epoch: the answers are formulaic, and a second epoch mostly memorises them."))
    max_steps: int = option(-1, help=(
        "-1 = run the epochs; a positive number caps steps (tests, demos, benchmarks)."))
    batch_size: int = option(4, help=(
        "4 x 4 = 16 sequences per optimizer step fits a T4's 16 GiB with gradient checkpointing."))
    grad_accum: int = option(4, help=(
        "Accumulate to 16 sequences per update without the memory of batch 16."))
    warmup_ratio: float = option(0.03, help=(
        "A short warm-up keeps the first updates of freshly initialised LoRA B matrices small."))
    lr_scheduler: str = option("cosine", help=(
        "Cosine decay ends near zero, so the last steps polish rather than jump."))
    max_grad_norm: float = option(1.0, help=(
        "Clipping at 1.0 is the Hugging Face default and guards against a single long-answer spike."))
    optim: str = option("paged_adamw_8bit", help=(
        "paged 8-bit AdamW is QLoRA's optimizer: optimizer state stays small and spills to CPU on "
        "spikes."))
    dtype: str = option("auto", help=(
        "auto: bf16 on GPUs with bf16 tensor cores (sm_80+) and on CPUs with avx512_bf16 or AMX (native bf16 "
        "matmuls beat fp32); fp16 with fp32 LoRA weights on older GPUs (T4) and float32 on other CPUs (AVX2 "
        "only), where bf16 is only emulated and far slower than fp32 (docs/results.md, \"CPUs without native "
        "bf16\")."))
    gradient_checkpointing: bool = option(True, help=(
        "Trades recomputation for activation memory; needed for batch 4 x 512 on a 16 GiB GPU."))
    padding_free: bool = option(True, help=(
        "Concatenate examples without padding (position ids keep them apart): no compute spent on "
        "padding."))
    group_by_length: bool = option(False, help=(
        "Batch rows of similar length together (transformers' LengthGroupedSampler: random batches, each drawn "
        "from a length-sorted pool) so a padded batch carries little padding. Off where padding_free already "
        "wastes nothing; the CPU preset pads, and there it saves the ~22% of a step spent on padding."))
    pad_to_multiple_of: int | None = option(None, help=(
        "Pad each batch's length up to a multiple of this (None: to its longest row). On CPU every new matmul "
        "shape gets its own oneDNN primitive, kept with its buffers in a cache of up to 1,024: padded batches of "
        "every length fill it and the process grows. A multiple leaves a few lengths, for less peak memory at the "
        "same step time (docs/results.md). TRL pads to 128 on Neuron for the same reason: one compilation per "
        "shape."))
    attn_implementation: str = option("sdpa", help=(
        "\"sdpa\" is fastest on GPU; eager is faster on CPU for short sequences (docs/results.md)."))
    loss_impl: str = option("auto", help=(
        "Where the loss's LM head runs. \"answer-logits\": only at trained (answer) positions, chunked "
        "fp32 cross-entropy (train/answer_loss.py); \"trl\": TRL's fused head; \"auto\": TRL's where it runs in "
        "Triton (CUDA/XPU, already answer-only there), answer-logits elsewhere. On CPU TRL's head "
        "scores every position and adds full-vocabulary entropy: answer-logits is faster at the same loss "
        "(docs/results.md, \"Training throughput\")."))
    upcast_frozen: bool = option(False, help=(
        "peft's prepare_model_for_kbit_training upcasts every frozen non-4-bit weight (embeddings = "
        "the tied LM head, norms) to fp32, so each step re-casts them to bf16: false keeps them in "
        "bf16 (bf16 compute only; fp16 keeps the upcast for range): faster, less memory, the same loss "
        "(docs/results.md)."))

    # --- preference stage --------------------------------------------------------------------------
    stage: str = option("sft", help=(
        "sft trains on the chosen answers (response_j), the recipe's default; dpo continues an SFT run's adapter "
        "on (chosen, rejected) pairs with TRL's DPOTrainer, the reference policy being that SFT model."))
    sft_run: str | None = option(None, help=(
        "The SFT run a dpo stage continues: its adapter, its saved split (so no test question is trained on by "
        "either stage) and its settings."))
    loss_type: str = option("simpo", help=(
        "simpo (Meng et al. 2024), the default: it compares per-token log-likelihoods, so length cannot buy reward, "
        "and it met the goal at full size where DPO's defaults made answers a third longer (a measured sweep: "
        "docs/results.md#the-default-preference-setting); sigmoid is DPO's own loss (Rafailov et al. 2023); ipo "
        "(Azar et al. 2023) regresses the log-ratio margin to 1/(2 beta) instead of pushing it without bound."))
    beta: float | None = option(None, help=(
        "How far the policy may move: unset, the loss's usual value, 0.1 for sigmoid and ipo (the DPO paper's and "
        "TRL's), 2.0 for simpo (the SimPO paper's); a lower beta lets DPO move further (and learn length)."))
    simpo_gamma: float = option(1.0, help=(
        "SimPO's target margin (loss_type simpo only): the chosen answer must beat the rejected one by gamma "
        "nats/token x beta; gamma/beta ~0.5 is the paper's range."))

    # --- logging, evaluation, checkpoints -----------------------------------------------------------
    logging_steps: int = option(10, help=(
        "~600 optimizer steps per epoch on the full data: 10 / 50 gives smooth curves and 12 evals."))
    eval_steps: int = option(50, help=(
        "Evaluate as often as we checkpoint, so each checkpoint has an eval loss."))
    save_steps: int = option(50, help=(
        "A checkpoint every 50 steps bounds what a crash can cost to minutes of GPU time."))
    save_total_limit: int = option(3, help=(
        "Keep a few checkpoints: enough to fall back past a corrupt one, not enough to fill a disk."))
    seed: int = option(42, help=(
        "One seed drives shuffling, the split, LoRA init and dropout: same seed, same run."))
    output_dir: str = option("runs/gemma-2b-it-psych", help=(
        "The run directory: config, logs, checkpoints, adapter and report all live here."))
    metrics_dir: str = option("metrics", help=(
        "Where TensorBoard scalars are exported as CSV, shared by all runs so they compare over time."))
    imgs_dir: str = option("imgs", help=(
        "Where loss plots go (one PNG per run)."))
    eval_generations: int = option(100, help=(
        "Held-out questions every column answers in `evaluate` (one per near-duplicate cluster): 100 give a judged "
        "win rate a 95% CI of about +-10 points; CPU presets answer fewer (docs/evaluation.md)."))

    @property
    def run_name(self) -> str:
        return Path(self.output_dir).name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- presets: YAML files a user can copy (configs/presets/NAME.yaml) -------------------------------------------

# The repository's presets. FINE_TUNE_LLM_PRESETS points at another folder of NAME.yaml files (the tests use it).
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
# A preset file's optional section of values a preference stage continuing one of its runs starts from.
STAGE_SECTIONS = ("dpo",)


def presets_dir() -> Path:
    return Path(os.environ.get("FINE_TUNE_LLM_PRESETS", PRESETS_DIR)).expanduser()


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file of option: value, with an error naming the file when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return loaded


class Presets(Mapping):
    """name -> the preset's values, read from its YAML file on each access, so an edited file takes effect."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        path = presets_dir() / f"{name}.yaml"
        if not path.is_file():
            raise KeyError(name)
        return read_yaml_mapping(path)

    def __iter__(self):
        return iter(sorted(p.stem for p in presets_dir().glob("*.yaml")))

    def __len__(self) -> int:
        return len(list(iter(self)))


PRESETS = Presets()


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_defaults() -> dict[str, Any]:
    """Each TrainConfig field's dataclass default (a fresh list where the default is a factory)."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(TrainConfig)}


# --- flags: transformers' HfArgumentParser reads the dataclass (types, defaults, help) --------------------------


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per TrainConfig field (--learning-rate and --learning_rate), typed by its annotation, with its
    help, type and default shown. Defaults are suppressed so only the flags given override preset and YAML."""
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(TrainConfig)
    defaults = field_defaults()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        before = len(parser._group_actions if hasattr(parser, "_group_actions") else parser._actions)
        typed = copy.copy(f)
        typed.type = hints[f.name]
        default = defaults[f.name]
        HfArgumentParser._parse_dataclass_field(parser, typed)
        actions = (parser._group_actions if hasattr(parser, "_group_actions") else parser._actions)[before:]
        for action in actions:
            action.option_strings.sort(key=lambda o: "_" in o)  # show --learning-rate first
            is_negation = action.option_strings[0].startswith("--no")
            text = (f"turn {f.name} off" if is_negation else
                    f"{f.metadata['help']} [{_type_name(hints[f.name])}; default: {_show(default)}]")
            action.help = text.replace("%", "%%")  # argparse formats help with %
            action.default = argparse.SUPPRESS
            if action.type is not None:
                action.type = _named(f.name, action.type, hints[f.name])
            action.metavar = None if action.nargs == 0 else f.name.upper()


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _named(name: str, convert: Any, hint: Any):
    """The parser's own converter, with an error that names the option."""
    def read(text: str):
        if isinstance(text, str) and text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        try:
            return convert(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"option {name!r}: cannot read {text!r} as {_type_name(hint)}") from None
    read.__name__ = getattr(convert, "__name__", name)
    return read


@functools.cache
def _converters() -> dict[str, Any]:
    """field name -> the converter its flag uses: YAML and notebook values go through the same ones."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    return {a.dest: (a.type, a.nargs) for a in parser._actions if a.type is not None}


def coerce(name: str, value: Any, converters: dict[str, Any]) -> Any:
    """A YAML or keyword value as the field's type, with the flag's converter; errors name the option."""
    if not isinstance(value, str) or name not in converters:
        return value
    convert, nargs = converters[name]
    try:
        if nargs == "+":  # a list option given as one string: "q_proj,v_proj"
            return [convert(v.strip()) for v in value.split(",") if v.strip()]
        return convert(value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(str(exc)) from None


LOSS_TYPES = ("sigmoid", "ipo", "simpo")
# The data formats (data/formats.py reads each); "columns" is the one --columns names.
DATA_FORMATS = ("auto", "messages", "sharegpt", "prompt-completion", "prompt-chosen-rejected", "question-response",
                "instruction", "columns")
# What --columns may name: one exchange (question, answer, optional rejected and system) or a conversation column.
COLUMN_FIELDS = ("question", "answer", "rejected", "system", "messages")
TRAIN_ON = ("all", "last")
# Values a dpo stage starts from, over the SFT run's settings; a preset file's `dpo:` section adds its own on top.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # LoRA DPO moves an already tuned adapter: ~1/10 of the SFT rate (TRL's 1e-6 is for full fine-tunes, where
    # every weight moves); a tenth of the steps warm up so the first updates stay near the reference.
    # SimPO at 7.5e-6: the setting of a measured sweep that met the goal at full size (docs/results.md#the-default-
    # preference-setting); beta None is resolved per loss (BETA), also when the SFT run recorded one.
    "dpo": {"loss_type": "simpo", "beta": None, "learning_rate": 7.5e-6, "warmup_ratio": 0.1, "num_epochs": 1.0,
            "max_steps": -1},
}
# beta when none is given: the DPO paper's and TRL's 0.1 for sigmoid and ipo, the SimPO paper's 2.0.
BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}
# What a preference stage may not change from its SFT run: the model, the data, the template and the adapter.
INHERITED = ("preset", "base_model", "gguf_file", "requires_cuda", "allow_pickle", "trust_remote_code", "dataset",
             "data_format", "columns", "train_on", "data_samples", "val_fraction", "test_fraction",
             "near_duplicate_threshold", "system_prompt", "max_length", "quantization", "lora_r", "lora_alpha",
             "target_modules", "lora_layers", "seed")


def make_config(preset: str = "gemma-2b-it", yaml_file: str | Path | None = None,
                base: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Preset (or `base`: an SFT run's values a preference stage continues), then the stage's defaults, then the
    YAML file, then explicit overrides (CLI flags or notebook parameters)."""
    if base is not None:
        preset = base.get("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)} "
                          f"(the files in {presets_dir()})")
    preset_values = PRESETS[preset]
    loaded = read_yaml_mapping(yaml_file) if yaml_file is not None else {}
    if "preset" in loaded and loaded["preset"] != preset and base is None:
        return make_config(loaded["preset"], yaml_file, **overrides)
    values: dict[str, Any] = {**_options(preset_values), "preset": preset} if base is None else dict(base)
    stage = overrides.get("stage") or loaded.get("stage") or values.get("stage", "sft")
    values.update({**STAGE_DEFAULTS.get(stage, {}), **preset_values.get(stage, {}), **loaded.get(stage, {})})
    values.update(_options(loaded))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("beta") is None:
        values["beta"] = BETA.get(values.get("loss_type", "simpo"), 0.1)
    if isinstance(values.get("columns"), Mapping):  # YAML's mapping form: the flag's text form is what is stored
        values["columns"] = ",".join(f"{k}={v}" for k, v in values["columns"].items())
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}; valid options: {', '.join(field_names())}")
    converters = _converters()
    cfg = TrainConfig(**{k: coerce(k, v, converters) for k, v in values.items()})
    validate(cfg)
    return cfg


def _options(values: dict[str, Any]) -> dict[str, Any]:
    """A preset or config file's option values, without its stage sections."""
    return {k: v for k, v in values.items() if k not in STAGE_SECTIONS}


def validate(cfg: TrainConfig) -> None:
    """Each check names the option(s) and the values that are wrong."""
    checks = [
        (cfg.quantization in ("4bit", "8bit", "none"), ["quantization"], "one of 4bit, 8bit, none"),
        (cfg.dtype in ("auto", "bfloat16", "float16", "float32"), ["dtype"],
         "one of auto, bfloat16, float16, float32"),
        (cfg.lora_r > 0, ["lora_r"], "a positive integer"),
        (0 <= cfg.lora_dropout < 1, ["lora_dropout"], "in [0, 1)"),
        (cfg.max_length >= 16, ["max_length"], "at least 16"),
        (cfg.batch_size > 0, ["batch_size"], "positive"),
        (cfg.pad_to_multiple_of is None or cfg.pad_to_multiple_of > 0, ["pad_to_multiple_of"], "positive or None"),
        (cfg.lora_layers is None or cfg.lora_layers > 0, ["lora_layers"], "positive or None"),
        (cfg.grad_accum > 0, ["grad_accum"], "positive"),
        (cfg.data_samples is None or cfg.data_samples > 0, ["data_samples"], "positive or None"),
        (0 <= cfg.val_fraction < 1, ["val_fraction"], "in [0, 1)"),
        (0 <= cfg.test_fraction < 1, ["test_fraction"], "in [0, 1)"),
        (0 < cfg.near_duplicate_threshold <= 1, ["near_duplicate_threshold"], "in (0, 1]"),
        (cfg.eval_generations >= 0, ["eval_generations"], "zero or more"),
        (cfg.val_fraction + cfg.test_fraction < 1, ["val_fraction", "test_fraction"],
         "fractions summing below 1, leaving rows to train on"),
        (cfg.learning_rate > 0, ["learning_rate"], "positive"),
        (cfg.attn_implementation in ("eager", "sdpa", "flash_attention_2"), ["attn_implementation"],
         "one of eager, sdpa, flash_attention_2"),
        (cfg.loss_impl in ("auto", "answer-logits", "trl"), ["loss_impl"], "one of auto, answer-logits, trl"),
        (cfg.stage in ("sft", "dpo"), ["stage"], "one of sft, dpo"),
        (cfg.stage != "dpo" or bool(cfg.sft_run), ["stage", "sft_run"], "paired: --stage dpo needs --sft-run RUN_DIR"),
        (cfg.loss_type in LOSS_TYPES, ["loss_type"], f"one of {', '.join(LOSS_TYPES)}"),
        (cfg.beta > 0, ["beta"], "positive"),
        (cfg.data_format in DATA_FORMATS, ["data_format"], f"one of {', '.join(DATA_FORMATS)}"),
        (cfg.train_on in TRAIN_ON, ["train_on"], f"one of {', '.join(TRAIN_ON)}"),
        (cfg.data_format in ("auto", "columns") if cfg.columns else cfg.data_format != "columns",
         ["data_format", "columns"], "paired: --columns reads the data as format 'columns' (leave --data-format auto)"),
    ]
    for ok, names, want in checks:
        if not ok:
            got = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names)
            raise ConfigError(f"option {'/'.join(repr(n) for n in names)} must be {want}; got {got}")
    if cfg.columns:
        parse_columns(cfg.columns)


def parse_columns(text: str) -> dict[str, str]:
    """--columns "question=Q,answer=A" as {"question": "Q", "answer": "A"}; errors name the option and the pair."""
    mapping: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",")):
        field_name, sep, column = (s.strip() for s in pair.partition("="))
        if not sep or not field_name or not column:
            raise ConfigError(f"option 'columns': {pair!r} is not FIELD=COLUMN (e.g. question=Q,answer=A)")
        if field_name not in COLUMN_FIELDS:
            raise ConfigError(f"option 'columns': unknown field {field_name!r}; fields: {', '.join(COLUMN_FIELDS)}")
        if field_name in mapping:
            raise ConfigError(f"option 'columns': field {field_name!r} is given twice")
        mapping[field_name] = column
    if "messages" in mapping and set(mapping) - {"messages", "rejected"}:
        raise ConfigError("option 'columns': messages=COLUMN holds whole conversations; it takes no question, "
                          "answer or system column (only an optional rejected=COLUMN)")
    if "messages" not in mapping and not {"question", "answer"} <= set(mapping):
        missing = [f for f in ("question", "answer") if f not in mapping]
        raise ConfigError(f"option 'columns': {' and '.join(missing)} missing; name both question and answer "
                          f"columns (or messages=COLUMN for conversations)")
    return mapping


__all__ = ["PRESETS", "TrainConfig", "add_config_arguments", "field_names", "make_config", "parse_columns", "validate"]
