"""Expected peak GPU memory of a training config, from the model's config.json alone (`train --dry-run`).

The arithmetic, per process, at the peak of a training step (the backward pass of the last decoder layer):
  weights      NF4 linear weights (4 bits + double-quantized absmax per 64 weights: 4.127 bits each), and the
               frozen float weights (embeddings, norms) in the dtype add_lora leaves them in;
  LoRA         adapter weights, their gradients and the optimizer's state (8-bit AdamW: 2 bytes + block absmax);
  activations  what autograd keeps per token and decoder layer (layer_bytes_per_token), for every layer without
               gradient checkpointing; with it, each layer's input plus one layer recomputed in the backward;
               plus the gradients in flight in the backward (half a layer's activations);
  logits       the answer-only loss holds the trained positions' logits and their gradient, in fp32 (train/answer_loss.py);
               TRL's Triton head holds one vocabulary tile.
A micro-batch is counted at its largest: batch_size x max_length tokens, all of them trained. On a GPU the CUDA
context and the allocator's slack come on top (CUDA_OVERHEAD), outside torch.cuda.max_memory_allocated().
Checked against the peak of live tensor bytes (torch profiler) of CPU training runs of Gemma-shaped models (the
tiny preset; hidden 512 with SDPA, with and without checkpointing and LoRA dropout; Gemma's 256k vocabulary): the
estimate came out a little above the measured peak (docs/results.md#memory-estimate; tests/test_memory_estimate.py
measures the tiny preset).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..model import hardware
from ..model.loading import adapted_layers, frozen_dtype, model_source

GB = 1e9
# CUDA context (about half a gigabyte on recent drivers), cuBLAS workspaces and the caching allocator's
# fragmentation; not yet checked on a GPU (docs/results.md#memory-estimate).
CUDA_OVERHEAD = 1.0e9
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 absmax
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWER_CE_CHUNK_BYTES = 2**25 * 4  # fast_loss.CE_CHUNK_ELEMENTS fp32 scratch
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


@dataclass
class Estimate:
    """Bytes per part at the peak of a training step; `summary()` prints it."""

    parts: dict[str, float]
    notes: dict[str, str]
    activations_other: float  # the activations with gradient checkpointing switched the other way
    checkpointing: bool
    overhead: float = CUDA_OVERHEAD
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_allocated(self) -> float:
        """What torch.cuda.max_memory_allocated() would report."""
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        """What the GPU must hold: the peak plus the CUDA context and allocator slack."""
        return self.peak_allocated + self.overhead

    def summary(self, capacity: float | None = None) -> str:
        lines = [f"expected peak GPU memory ({', '.join(f'{k} {v}' for k, v in self.settings.items())}):"]
        lines += [f"  {name:<22}{b / GB:7.2f} GB  {self.notes.get(name, '')}" for name, b in self.parts.items()]
        other = self.total - self.parts["activations"] + self.activations_other
        lines.append(f"  {'':<22}{'':7}    (gradient checkpointing {'off' if self.checkpointing else 'on'}: "
                     f"activations {self.activations_other / GB:.2f} GB, needs {other / GB:.2f} GB)")
        lines.append(f"  {'peak allocated':<22}{self.peak_allocated / GB:7.2f} GB  (torch.cuda.max_memory_allocated)")
        lines.append(f"  {'+ CUDA context, slack':<22}{self.overhead / GB:7.2f} GB")
        lines.append(f"  {'needs':<22}{self.total / GB:7.2f} GB"
                     + (f" of {capacity / GB:.1f} GB on this GPU" if capacity else ""))
        return "\n".join(lines)


def estimate(cfg: TrainConfig, model_config, tokens: int | None = None, trained: int | None = None) -> Estimate:
    """Peak memory of one training step of `cfg` on `model_config` (a transformers PretrainedConfig). `tokens` and
    `trained` per micro-batch default to the worst case: batch_size x max_length, every one trained."""
    s = ModelShape.of(model_config)
    tokens = tokens or cfg.batch_size * cfg.max_length
    trained = tokens if trained is None else trained
    b = _dtype_bytes(cfg)
    n_lora = lora_parameters(cfg, s)
    shards = _fsdp_shards()
    ckpt = activation_bytes(cfg, s, tokens, b, checkpointing=True)
    full = activation_bytes(cfg, s, tokens, b, checkpointing=False)
    parts = {
        "weights (quantized)": _quantized_weight_bytes(cfg, s, b) / shards,
        "weights (float)": _float_weight_bytes(cfg, s, b) / shards,
        "LoRA + gradients": 2 * n_lora * b["trainable"] / shards,
        "optimizer state": optimizer_bytes(cfg, s) / shards,
        "activations": ckpt if cfg.gradient_checkpointing else full,
        "logits": logit_bytes(cfg, s, trained),
    }
    notes = _notes(cfg, s, n_lora, tokens, trained, b)
    return Estimate(parts, notes, full if cfg.gradient_checkpointing else ckpt, cfg.gradient_checkpointing,
                    settings={"dtype": hardware.precision(cfg).dtype, "quantization": cfg.quantization,
                              "batch": f"{cfg.batch_size}x{cfg.max_length}", "checkpointing": cfg.gradient_checkpointing,
                              "optim": cfg.optim})


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs from a model's config.json (Llama/Gemma-style decoder layers)."""

    hidden: int
    inter: int
    layers: int
    heads: int
    q: int  # heads x head_dim
    kv: int  # kv heads x head_dim
    vocab: int
    tied: bool

    @classmethod
    def of(cls, c) -> ModelShape:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_attention_heads * head_dim, kv_heads * head_dim, c.vocab_size,
                   bool(getattr(c, "tie_word_embeddings", True)))

    def linears(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.q, self.kv, self.inter
        return dict(zip(PROJECTIONS, [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]))


def _dtype_bytes(cfg: TrainConfig) -> dict[str, int]:
    """Bytes per element: compute (activations, logits), frozen float weights, LoRA weights (TRL casts them to bf16
    on quantized models only; modeling.restore_trainable_dtype makes them fp32 again for fp16 and fp32 runs)."""
    p = hardware.precision(cfg)
    size = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
    compute = 4 if p.dtype == "float32" else 2
    if cfg.quantization == "none":
        frozen = compute
    else:  # peft's prepare_model_for_kbit_training upcasts to fp32; add_lora may cast back
        frozen = size[frozen_dtype(cfg) or torch.float32]
    trainable = 4 if cfg.quantization == "none" else size[p.trainable_dtype]  # peft's fp32 adapters
    return {"compute": compute, "frozen": frozen, "trainable": trainable}


def _fsdp_shards() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)) if hardware.fsdp() else 1


def _quantized_weight_bytes(cfg: TrainConfig, s: ModelShape, b: dict[str, int]) -> float:
    n = s.layers * sum(i * o for i, o in s.linears().values())
    per = {"4bit": NF4_BITS / 8, "8bit": 1.0, "none": b["frozen"]}[cfg.quantization]
    return n * per


def _float_weight_bytes(cfg: TrainConfig, s: ModelShape, b: dict[str, int]) -> float:
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = (2 * s.layers + 1) * s.hidden
    return (embeddings + norms) * b["frozen"]


def adapted_count(cfg: TrainConfig, s: ModelShape) -> int:
    """How many decoder layers carry LoRA (cfg.lora_layers): autograd keeps activations for those only."""
    return len(adapted_layers(cfg, s.layers) or range(s.layers))


def lora_parameters(cfg: TrainConfig, s: ModelShape) -> int:
    shapes = s.linears()
    per_layer = sum(cfg.lora_r * (i + o) for name, (i, o) in shapes.items() if name in cfg.target_modules)
    return adapted_count(cfg, s) * per_layer


def optimizer_bytes(cfg: TrainConfig, s: ModelShape) -> float:
    """AdamW's two moments: 8-bit blockwise (1 byte + fp32 absmax per 256) for tensors of 4096+ elements
    (bitsandbytes' min_8bit_size), fp32 otherwise; torch's AdamW keeps them in the parameter's dtype."""
    trainable = _dtype_bytes(cfg)["trainable"]
    total = 0.0
    for name, (i, o) in s.linears().items():
        if name not in cfg.target_modules:
            continue
        for n in (cfg.lora_r * i, cfg.lora_r * o):  # lora_A, lora_B
            if "8bit" in cfg.optim:
                total += 2 * n * (1 + 4 / 256) if n >= 4096 else 2 * n * 4
            else:
                total += 2 * n * (trainable if cfg.optim.startswith("adamw_torch") else 4)
    return adapted_count(cfg, s) * total


def layer_bytes_per_token(cfg: TrainConfig, s: ModelShape, compute: int, residual: int) -> float:
    """What autograd keeps per token for one decoder layer's backward (LoRA on every projection, SDPA):
    two RMSNorms (the fp32 input their variance needs + the output every projection reads); q, k, v as
    attention saves them (k and v repeated to all heads, as transformers does when a packed batch has a mask),
    the attention output and its contiguous copy for o_proj; the MLP's gate, up, activation and product; and with
    LoRA dropout a dropped copy and a mask of every projection's input."""
    h, q, i = s.hidden, s.q, s.inter
    norms = 2 * (max(4, residual) * h + compute * h)
    attention = compute * (q + 2 * q + 2 * q)
    mlp = 4 * compute * i
    dropout = (compute + 1) * (5 * h + q + i) if cfg.lora_dropout > 0 else 0
    lora = compute * 2 * cfg.lora_r * len(cfg.target_modules)
    return norms + attention + mlp + dropout + lora


def eager_scores_bytes(cfg: TrainConfig, s: ModelShape, tokens: int, compute: int) -> float:
    """Eager attention keeps the fp32 softmax and its cast per head: quadratic in the row length. Padding-free
    packs a micro-batch into one row of `tokens`; padded batches have batch_size rows of max_length."""
    if cfg.attn_implementation != "eager":
        return 0.0
    rows = [tokens] if cfg.padding_free else [cfg.max_length] * cfg.batch_size
    cast = 0 if compute == 4 else compute  # a float32 run's softmax needs no cast back to the compute dtype
    return sum(s.heads * r * r * (4 + cast) for r in rows)


def activation_bytes(cfg: TrainConfig, s: ModelShape, tokens: int, b: dict[str, int], checkpointing: bool) -> float:
    residual = b["frozen"] if cfg.quantization != "none" else b["compute"]
    layer = layer_bytes_per_token(cfg, s, b["compute"], residual) * tokens + eager_scores_bytes(cfg, s, tokens,
                                                                                                 b["compute"])
    # The gradients of the layer being differentiated: half its activations fit the peaks measured on CPU
    # (see the module docstring).
    in_flight = layer / 2
    adapted = adapted_count(cfg, s)  # below the lowest adapted layer nothing needs a gradient: nothing is kept
    if checkpointing:
        return adapted * residual * s.hidden * tokens + layer + in_flight
    return adapted * layer + in_flight


def logit_bytes(cfg: TrainConfig, s: ModelShape, trained: int) -> float:
    from .answer_loss import choose

    if choose(cfg.loss_impl)[0]:
        # The logits at trained positions and their gradient, both fp32 whatever the compute dtype: under mixed
        # precision accelerate wraps the forward in convert_outputs_to_fp32 (measured: a fp32 copy of the bf16
        # logits), and the gradient takes the logits' dtype; plus one fp32 chunk of the cross-entropy.
        return 2 * trained * s.vocab * 4 + min(ANSWER_CE_CHUNK_BYTES, trained * s.vocab * 4)
    return trained * min(s.vocab, TRL_VOCAB_TILE) * 4 * 2  # TRL's fused head: one fp32 tile and its gradient


def _notes(cfg: TrainConfig, s: ModelShape, n_lora: int, tokens: int, trained: int, b: dict[str, int]) -> dict[str, str]:
    n_linear = s.layers * sum(i * o for i, o in s.linears().values())
    return {
        "weights (quantized)": f"{n_linear / 1e9:.2f}B linear weights, {cfg.quantization}",
        "weights (float)": f"embeddings + norms, {b['frozen']} bytes each",
        "LoRA + gradients": f"{n_lora / 1e6:.1f}M parameters x {b['trainable']} bytes, twice",
        "optimizer state": cfg.optim,
        "activations": f"{tokens} tokens per micro-batch, {adapted_count(cfg, s)} of {s.layers} layers"
                       + (", checkpointed" if cfg.gradient_checkpointing else ""),
        "logits": f"{trained} trained positions x {s.vocab:,} vocabulary",
    }


# --- refusing what cannot fit ---------------------------------------------------------------------------------

def check_fits(cfg: TrainConfig, model_config, capacity: float) -> Estimate:
    """The estimate, or ConfigError naming the one setting that would make it fit (or saying none does)."""
    est = estimate(cfg, model_config)
    if est.total <= capacity:
        return est
    fix = first_fix(cfg, model_config, capacity)
    advice = (f"set {fix[0]} (estimated {fix[1] / GB:.1f} GB)" if fix else
              "no single setting makes it fit: use a GPU with more memory, or shard the model across GPUs with "
              "`accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml`")
    raise ConfigError(f"this config needs about {est.total / GB:.1f} GB of GPU memory and the GPU has "
                      f"{capacity / GB:.1f} GB: {advice}.\n{est.summary(capacity)}")


def candidate_fixes(cfg: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    """Single changes, mildest first: each keeps the recipe's sequences per optimizer update."""
    out = []
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing true", {"gradient_checkpointing": True}))
    batch, accum = cfg.batch_size, cfg.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        out.append((f"--batch-size {batch} --grad-accum {accum}", {"batch_size": batch, "grad_accum": accum}))
    if cfg.quantization != "4bit":
        out.append(("--quantization 4bit", {"quantization": "4bit"}))
    if "8bit" not in cfg.optim:
        out.append(("--optim paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    return out


def first_fix(cfg: TrainConfig, model_config, capacity: float) -> tuple[str, float] | None:
    for flags, change in candidate_fixes(cfg):
        total = estimate(dataclasses.replace(cfg, **change), model_config).total
        if total <= capacity:
            return flags, total
    return None


def load_model_config(cfg: TrainConfig):
    """The base model's config.json (no weights): local folder, the tiny build, or the Hub / its cache."""
    from transformers import AutoConfig

    source, kwargs = model_source(cfg)
    return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)


def dry_run(cfg: TrainConfig) -> Estimate:
    """`train --dry-run`: the estimate for this config on this machine's GPU; ConfigError if it cannot fit."""
    model_config = load_model_config(cfg)
    capacity = hardware.visible_gpu_bytes()
    return check_fits(cfg, model_config, capacity) if capacity else estimate(cfg, model_config)


def refuse_if_too_big(cfg: TrainConfig) -> None:
    """Before loading any weight on a GPU: stop at once when the config cannot fit it."""
    capacity = hardware.visible_gpu_bytes()
    if capacity:
        check_fits(cfg, load_model_config(cfg), capacity)
