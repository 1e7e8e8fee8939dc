"""Stage 2: merge the adapter into the base weights and save a standalone bf16 model, with a parity check.

Two ways to merge, both into full-precision weights:
- "bf16": the base as released (bf16 on disk), the usual merge;
- "nf4": the base's NF4-quantized weights, dequantized (bitsandbytes' dequantize_4bit, via transformers'
  `dequantize`) - the weights the adapter actually saw in QLoRA training, so this merge reproduces the trained
  model most closely.
Merging into the 4-bit model itself is refused: PEFT re-quantizes W + BA to NF4, and the NF4 step is far coarser
than the LoRA update, so most of what training learned is rounded away (`measure_4bit_merge` shows by how much).

Work happens in float32 (bf16 weights upcast exactly), the merged weights are rounded to bf16 once, on save.
The parity check reloads the saved files and compares them with base + adapter in float32.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ReleaseCheckFailed
from ..files import AGAIN, human_bytes, read_json, require_space, write_json
from ..model.generation import generation_config
from ..model.hardware import check_environment, device_map
from ..model.loading import guard_cpu_4bit, load_model
from .checks import check_common, check_tokenizer
from .common import (
    CheckResult,
    RunFiles,
    checked_adapter,
    locate_run,
    release_lock,
    save_tokenizer,
    staged,
    tokenizer_model_source,
)
from .modelcard import require_license, write_card
from .parity import EFFECT_RTOL, LOGIT_ATOL, LOSS_ATOL, Parity, Probe, build_probe, compare, measure

log = logging.getLogger(__name__)
MODES = ("bf16", "nf4")
PARITY_FILE = "parity.json"
# Saved bytes may exceed 2 bytes per parameter only by the safetensors headers.
SIZE_SLACK = 0.01


@dataclass
class MergeResult:
    folder: Path
    mode: str
    parity: Parity
    parameters: int
    weight_bytes: int

    def summary(self) -> str:
        return (f"merged ({self.mode}) -> {self.folder}: {self.parameters:,} parameters, "
                f"{human_bytes(self.weight_bytes)} of bf16 safetensors; parity "
                f"{'PASSED' if self.parity.passed else 'FAILED'}: {self.parity.summary()}")


@dataclass
class Opened:
    """What both merges start from: the run, its tokenizer, the parity probe, base + adapter and its outputs."""

    run: RunFiles
    tokenizer: Any
    probe: Probe
    model: Any
    base: dict[str, Any]  # the probe's outputs with the adapter switched off
    reference: dict[str, Any]  # ... and with it on: what the merge must reproduce


def open_run(run: RunFiles, quantized: bool, n_prompts: int, n_eval: int) -> Opened:
    from transformers import AutoTokenizer

    if quantized and run.cfg.quantization != "4bit":
        raise ConfigError(f"this run trained with quantization={run.cfg.quantization!r}, not 4bit: use mode 'bf16'")
    tok = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    probe = build_probe(run.require_run("the parity check"), run.cfg, tok, n_prompts, n_eval)
    model = _with_adapter(run, quantized=quantized)
    with model.disable_adapter():
        base = measure(model, probe)
    return Opened(run, tok, probe, model, base, measure(model, probe))


def merge_adapter(run_or_adapter: str | Path, out_dir: str | Path | None = None, *, mode: str = "bf16",
                  n_prompts: int = 4, n_eval: int = 32, logit_atol: float = LOGIT_ATOL, loss_atol: float = LOSS_ATOL,
                  effect_rtol: float = EFFECT_RTOL, license: str | None = None, dataset_id: str | None = None,
                  tokenizer_model: str | Path | None = None, base_model_id: str | None = None,
                  overwrite: bool = False) -> MergeResult:
    """Merge, save bf16 safetensors (default: RUN/release/merged), check parity; raise if it fails."""
    if mode == "4bit":
        parity = measure_4bit_merge(run_or_adapter, n_prompts=n_prompts, n_eval=n_eval, logit_atol=logit_atol,
                                    loss_atol=loss_atol, effect_rtol=effect_rtol)
        raise ReleaseCheckFailed(refusal_message(parity))
    if mode not in MODES:
        raise ConfigError(f"merge mode {mode!r}: choose one of {', '.join(MODES)} (merging into 4-bit weights is "
                          f"refused: it rounds the adapter away)")
    run = locate_run(run_or_adapter, base_model_id)
    require_license(run, license)  # before the heavy work, not after it
    check_environment(run.cfg, purpose="release")
    final = Path(out_dir) if out_dir else run.release_dir("merged")
    with release_lock(checked_adapter(run), "merge"), staged(final, overwrite) as out:
        result = _merge_into(open_run(run, mode == "nf4", n_prompts, n_eval), out, mode,
                             (logit_atol, loss_atol, effect_rtol), license, dataset_id, tokenizer_model)
    result.folder = final
    log.info(result.summary())
    return result


def _merge_into(o: Opened, out: Path, mode: str, tolerances: tuple[float, float, float], license: str | None,
                dataset_id: str | None, tokenizer_model) -> MergeResult:
    run, model = o.run, o.model
    if mode == "nf4":  # the same NF4 weights, dequantized, under a fresh copy of the adapter
        model = _with_adapter(run, quantized=True, base_model=_dequantized(model.unload()))
    lora_weights = merged_weight_names(model)
    merged = model.merge_and_unload(safe_merge=True)
    del model, o.model
    # bf16 base weights sit on the bf16 grid, and most LoRA updates are smaller than half its step there:
    # rounding W + BA to nearest gives W back for most entries and loses much of the update (measured on
    # SmolLM2-135M: 80-89% of entries unchanged, 26-48% of the update kept). Stochastic rounding keeps it
    # in expectation. Dequantized NF4 weights are off the grid, so nearest rounding is already unbiased there.
    rounding = "stochastic" if mode == "bf16" else "nearest"
    to_bf16(merged, lora_weights if rounding == "stochastic" else set(), seed=run.cfg.seed)
    _save_bf16(merged, o.tokenizer, out, run, tokenizer_model)
    del merged
    gc.collect()
    saved = _load_saved(out, run)
    parity = compare(o.reference, measure(saved, o.probe), o.base, *tolerances)
    del saved
    gc.collect()
    params, weight_bytes = _size_facts(out)
    write_json(out / PARITY_FILE, {"mode": mode, "reference": _reference_name(run, mode), "compute": "float32",
                                   "rounding_to_bf16": rounding, "prompt_rows": o.probe.prompt_rows,
                                   "eval_rows": o.probe.eval_rows, **parity.to_dict()})
    if not parity.passed:
        hint = (" Mode 'nf4' merges into the weights this 4-bit run trained against."
                if mode == "bf16" and run.cfg.quantization == "4bit" else "")
        raise ReleaseCheckFailed(f"parity check failed: {parity.summary()}. Nothing was written.{hint}")
    _write_merged_card(out, run, mode, parity, params, weight_bytes, license, dataset_id)
    check_merged(out).raise_if_failed()
    return MergeResult(out, mode, parity, params, weight_bytes)


def measure_4bit_merge(run_or_adapter: str | Path, n_prompts: int = 4, n_eval: int = 32,
                       logit_atol: float = LOGIT_ATOL, loss_atol: float = LOSS_ATOL,
                       effect_rtol: float = EFFECT_RTOL) -> Parity:
    """What merging into the 4-bit weights does: PEFT's merge into Linear4bit vs the unmerged 4-bit + adapter."""
    import warnings

    o = open_run(locate_run(run_or_adapter), True, n_prompts, n_eval)
    with warnings.catch_warnings():  # PEFT's own warning says the same thing, without numbers
        warnings.simplefilter("ignore")
        merged = o.model.merge_and_unload()
    return compare(o.reference, measure(merged, o.probe), o.base, logit_atol, loss_atol, effect_rtol)


def refusal_message(parity: Parity) -> str:
    return ("refusing to merge into the 4-bit weights: PEFT re-quantizes W + BA to NF4, which rounds most of the "
            f"adapter away. Measured against the unmerged 4-bit model + adapter: {parity.summary()}. Merge into "
            f"bf16 weights instead (mode 'bf16'), or into the dequantized NF4 weights (mode 'nf4').")


def _fp32(run: RunFiles):
    return dataclasses.replace(run.cfg, dtype="float32")


def _with_adapter(run: RunFiles, quantized: bool, base_model=None):
    """base (4-bit as trained, or full precision) + the adapter, float32 compute, frozen."""
    from peft import PeftModel

    if base_model is None:
        base_model = load_model(_fp32(run), quantize=quantized, dtype=torch.float32)
    model = PeftModel.from_pretrained(base_model, str(run.adapter_dir), is_trainable=False)
    guard_cpu_4bit(model)
    model.eval()
    return model


def _dequantized(model):
    """Linear4bit -> torch.nn.Linear holding bitsandbytes' dequantized NF4 weights; quantization config removed."""
    import bitsandbytes as bnb

    model = model.dequantize(dtype=torch.float32)
    left = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if left:
        raise ReleaseCheckFailed(f"{len(left)} layer(s) are still 4-bit after dequantizing, e.g. {left[0]}")
    return model


def merged_weight_names(peft_model) -> set[str]:
    """Names, in the merged model, of the weights LoRA changes."""
    prefix = "base_model.model."
    return {f"{name.removeprefix(prefix)}.weight" for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")}


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bf16, rounding up with probability equal to the distance from the lower neighbour, so the
    expected result is x. bf16 is float32's upper 16 bits: add uniform noise to the lower 16, then cut them."""
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device="cpu")
    rounded = (bits + noise.to(bits.device)) & -(1 << 16)
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    keep = ~torch.isfinite(x)  # inf and nan stay what they were
    return torch.where(keep, x.to(torch.bfloat16), out) if keep.any() else out


def to_bf16(model, stochastic: set[str], seed: int) -> None:
    """Cast every parameter to bf16: stochastically for the named weights, to nearest for the rest."""
    gen = torch.Generator().manual_seed(seed)
    missing = stochastic - {name for name, _ in model.named_parameters()}
    if missing:  # PEFT renamed something: fail loudly rather than round those weights to nearest
        raise ReleaseCheckFailed(f"merged weights not found in the merged model: {sorted(missing)[:3]}")
    for name, param in model.named_parameters():
        if name in stochastic and param.dtype == torch.float32:
            param.data = stochastic_round_bf16(param.data, gen)
    model.to(torch.bfloat16)


def _save_bf16(model, tokenizer, out: Path, run: RunFiles, tokenizer_model) -> None:
    need = 2 * sum(p.numel() for p in model.parameters())  # bf16 weights; the tokenizer adds a little
    require_space(out, need, f"saving the merged model into {out}", AGAIN)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out, tokenizer_model_source(run.cfg, tokenizer_model))
    generation_config(tokenizer, getattr(model, "generation_config", None)).save_pretrained(str(out))


def _load_saved(out: Path, run: RunFiles):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map=device_map(),
                                                attn_implementation=run.cfg.attn_implementation,
                                                use_safetensors=True)


def _reference_name(run: RunFiles, mode: str) -> str:
    return {"bf16": f"{run.base_id} (bf16 weights) + adapter, unmerged",
            "nf4": f"{run.base_id} loaded 4-bit NF4 as in training + adapter, unmerged"}[mode]


# --- the folder's own check ------------------------------------------------------------------------------------


def safetensors_facts(folder: Path) -> dict[str, Any]:
    """Tensor dtypes, element count and bytes of every *.safetensors file, read from the headers only."""
    from safetensors import safe_open

    dtypes: dict[str, int] = {}
    numel = data_bytes = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                dt = sl.get_dtype()
                dtypes[dt] = dtypes.get(dt, 0) + 1
                numel += n
                data_bytes += n * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1,
                                   "I8": 1, "BOOL": 1}.get(dt, 4)
    return {"files": [f.name for f in files], "dtypes": dtypes, "numel": numel, "data_bytes": data_bytes,
            "file_bytes": sum(f.stat().st_size for f in files)}


def expected_parameters(folder: Path) -> int:
    """Unique parameters of the architecture in config.json (tied embeddings once), built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _size_facts(folder: Path) -> tuple[int, int]:
    facts = safetensors_facts(folder)
    return facts["numel"], facts["file_bytes"]


def check_merged(folder: str | Path) -> CheckResult:
    """bf16 safetensors of exactly the architecture's size, tokenizer + generation config, a passed parity check."""
    folder = Path(folder)
    result = CheckResult(folder, "merged model")
    config = read_json(folder / "config.json")
    if config is None:
        result.errors.append("config.json is missing or unreadable")
    elif config.get("quantization_config"):
        result.errors.append("config.json still carries a quantization_config: this is not a full-precision model")
    facts = safetensors_facts(folder)
    result.facts["weights"] = facts
    if not facts["files"]:
        result.errors.append("no *.safetensors weights")
    elif set(facts["dtypes"]) != {"BF16"}:
        result.errors.append(f"weights must all be bf16; found tensor dtypes {facts['dtypes']}")
    if config is not None and facts["files"]:
        try:
            expected = expected_parameters(folder)
        except Exception as exc:  # noqa: BLE001 - a config that does not build is a failed check, with its cause
            result.errors.append(f"config.json does not build a model ({type(exc).__name__}: {exc})")
        else:
            want = 2 * expected
            result.facts.update(expected_parameters=expected, expected_bytes=want)
            if facts["numel"] != expected:
                result.errors.append(f"the weights hold {facts['numel']:,} values; the architecture has "
                                     f"{expected:,} parameters")
            if facts["file_bytes"] > want * (1 + SIZE_SLACK) + 2**20:
                result.errors.append(f"weights take {human_bytes(facts['file_bytes'])} on disk; bf16 needs "
                                     f"{human_bytes(want)} (2 bytes x {expected:,} parameters)")
    parity = read_json(folder / PARITY_FILE)
    if parity is None:
        result.errors.append(f"{PARITY_FILE} is missing: the merge was not verified (run `release merge`)")
    elif parity.get("passed") is not True:
        result.errors.append(f"{PARITY_FILE}: the parity check failed (max |logit diff| "
                             f"{parity.get('max_abs_logit_diff')}, loss diff {parity.get('loss_diff')})")
    pickled = [p.name for p in folder.glob("*.bin")]
    if pickled:
        result.errors.append(f"pickled weights {', '.join(pickled)} next to the safetensors")
    check_tokenizer(result, need_sp_model=False)
    check_common(result, "merged")
    return result


def _write_merged_card(out: Path, run: RunFiles, mode: str, parity: Parity, params: int, weight_bytes: int,
                       license: str | None, dataset_id: str | None) -> None:
    how = {"bf16": "the base model's bf16 weights", "nf4": "the base model's NF4 weights as loaded in QLoRA "
           "training, dequantized to full precision"}[mode]
    summary = (f"`{run.base_id}` with a LoRA adapter merged into {how}, saved as bf16 safetensors "
               f"({params:,} parameters, {human_bytes(weight_bytes)}). A standalone model: no PEFT needed.")
    p = parity
    section = "\n".join([
        "## Merge verification", "",
        (f"The saved weights were reloaded and compared, in float32, with the unmerged model they replace "
        f"({_reference_name(run, mode)}), on {len(p_rows(out))} held-out test prompts ({p.positions:,} positions) "
        f"and {p.eval_tokens:,} answer tokens of the validation split."), "",
        "| check | measured | tolerance |", "|---|---|---|",
        f"| max abs logit difference | {p.max_abs_logit_diff:.4g} | {p.logit_atol} |",
        f"| mean abs logit difference | {p.mean_abs_logit_diff:.4g} | |",
        (f"| mean difference / the adapter's mean effect on the logits ({p.adapter_effect_mean_abs:.4g}) | "
        f"{100 * (p.effect_ratio or 0):.2f}% | {100 * p.effect_rtol:.0f}% |"),
        f"| top-1 token agreement | {100 * p.top1_agreement:.2f}% | |",
        (f"| eval loss, unmerged -> merged | {p.reference_loss:.5f} -> {p.merged_loss:.5f} "
        f"(diff {p.loss_diff:+.2g}) | {p.loss_atol} |"), "",
        f"Result: {'passed' if p.passed else 'FAILED'}. Full numbers in `{PARITY_FILE}`.", "",
        ("The merged weights were rounded to bf16 once, on saving"
         + (", stochastically for the matrices LoRA changed (seed " + str(run.cfg.seed) + "): most LoRA updates "
            "are smaller than half a bf16 step of the weight they are added to, and rounding to nearest would "
            "return the base weight and drop them." if mode == "bf16" else ", to nearest.")),
    ])
    write_card(out, "merged", run, summary, license=license, dataset=dataset_id, extra_sections=[section])


def p_rows(out: Path) -> list[Any]:
    return (read_json(out / PARITY_FILE) or {}).get("prompt_rows", [])

