"""The machine a run lands on: the precision for its GPU, each process's device, and the environment check.

Everything that reads torch.cuda or the launcher's environment variables lives here, so the rest of the package
asks one question (`precision(cfg)`, `device_map()`, `check_environment(cfg)`) and gets one answer.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EnvironmentNotReady

log = logging.getLogger(__name__)
OFFLINE_HINT = "`fine-tune-llm demo` (or `--preset tiny`) runs offline on CPU"
# The oldest NVIDIA driver each CUDA major version runs on (CUDA release notes, "minimum driver version").
MIN_DRIVER = {"13": "580", "12": "525", "11": "450"}
_warned: set[str] = set()


# --- precision ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """How a run computes: the float dtype the model loads and computes in (also the 4-bit matmuls' compute
    dtype), where it runs, why this dtype, and a warning when the choice is slow here."""

    dtype: str  # "bfloat16" | "float16" | "float32"
    device: str  # "cpu" or the GPU, e.g. "Tesla T4 (sm_75)"
    reason: str
    warning: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bf16(self) -> bool:
        """The Trainer's bf16 flag (autocast; on CPU too, as before)."""
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        """The Trainer's fp16 flag: autocast + GradScaler, which exist on GPUs only."""
        return self.dtype == "float16" and self.device != "cpu"

    @property
    def trainable_dtype(self) -> torch.dtype:
        """The LoRA weights' dtype. bf16 runs keep TRL's bf16 cast; fp16 needs fp32 master weights (GradScaler
        refuses fp16 and bf16 gradients), and a float32 run is float32 throughout."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    @property
    def fsdp_dtype(self) -> torch.dtype:
        """Under FSDP every float tensor of a wrapped block (packed 4-bit storage, norms, LoRA) must share one
        dtype: the trainable dtype, so fp16 runs store and shard in fp32 and compute in fp16 under autocast."""
        return self.trainable_dtype


def gpu_name() -> str:
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} (sm_{props.major}{props.minor})"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX), as oneDNN needs for fast bf16 matmuls.
    Without them (AVX2-only CPUs) torch emulates bf16, and bf16 matmuls and training steps run many times slower
    than in fp32 (docs/results.md#cpus-without-native-bf16)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _resolve_cpu(requested: str) -> Precision:
    native = cpu_has_native_bf16()
    if requested == "auto":
        if native:
            return Precision("bfloat16", "cpu", "auto: this CPU has native bf16 (avx512_bf16/AMX)")
        return Precision("float32", "cpu", "auto: this CPU has no native bf16 (no avx512_bf16 nor AMX), bf16 "
                                           "would be emulated, many times slower than fp32")
    warning = None
    if requested == "bfloat16" and not native:
        warning = ("--dtype bfloat16 on a CPU without avx512_bf16 or AMX: torch emulates bf16 and every matmul runs "
                   "many times slower than in float32 (docs/results.md); --dtype auto picks float32 here")
        _warn_once(warning)
    return Precision(requested, "cpu", f"--dtype {requested}", warning)


def resolve_precision(requested: str) -> Precision:
    """`auto`: bf16 where the GPU has bf16 tensor cores (sm_80+), fp16 on older GPUs; on CPU bf16 where it is
    native (avx512_bf16 or AMX, where bf16 matmuls beat fp32), float32 elsewhere (emulated bf16 is much slower:
    docs/results.md#cpus-without-native-bf16). An explicit dtype wins, with a warning for emulated bf16."""
    if not torch.cuda.is_available():
        return _resolve_cpu(requested)
    name = gpu_name()
    # is_bf16_supported() alone also says yes on a T4, where torch emulates bf16 (including_emulation=True):
    # bitsandbytes then dequantizes and runs plain bf16 matmuls without tensor cores.
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested != "auto":
        warning = None
        if requested == "bfloat16" and not native:
            warning = (f"--dtype bfloat16 on {name}: this GPU has no bf16 tensor cores, so torch emulates bf16 and "
                       f"4-bit matmuls run slowly; --dtype auto picks float16 here")
            _warn_once(warning)
        return Precision(requested, name, f"--dtype {requested}", warning)
    if native:
        return Precision("bfloat16", name, "auto: native bf16 (sm_80+)")
    return Precision("float16", name, "auto: no bf16 tensor cores before sm_80, fp16 with fp32 LoRA weights")


def precision(cfg) -> Precision:
    return resolve_precision(cfg.dtype)


def resolved(cfg):
    """cfg with `dtype: auto` replaced by the dtype this machine trains in, so the run's config.yaml, manifest and
    model card record what training used (and a resume on another kind of GPU is caught as a changed option)."""
    import dataclasses

    return dataclasses.replace(cfg, dtype=precision(cfg).dtype)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# --- placement ------------------------------------------------------------------------------------------------

def fsdp() -> bool:
    """Launched by `accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def launch_mode() -> str:
    """"fsdp", "ddp" (several processes from accelerate/torchrun) or "single" (one process)."""
    if fsdp():
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "single"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def device_map() -> dict[str, Any] | None:
    """Where this process loads the model: None on CPU, else one whole copy on this process's GPU.

    Under FSDP the process group is started first: without it transformers does not know it runs under FSDP, and
    bitsandbytes quantizes every rank's weights onto torch.cuda.current_device(), cuda:0 on every rank ("Inconsistent
    compute device and device_id on rank 1" when FSDP wraps). FSDP then shards the copy on this rank's GPU.
    """
    if not torch.cuda.is_available():
        return None
    mode = launch_mode()
    if mode == "single":
        return {"": 0}  # check_placement refuses training with more than one GPU visible to one process
    if mode == "fsdp":
        start_process_group()
    return {"": local_rank()}


def start_process_group() -> None:
    """accelerate's process state: initializes torch.distributed and calls torch.cuda.set_device(LOCAL_RANK)."""
    from accelerate import PartialState

    PartialState()


def check_placement() -> None:
    """One process must see one GPU: with more, the Trainer wraps the model in nn.DataParallel, which TRL refuses
    (after minutes of loading) and which would be slower than one GPU anyway."""
    if not torch.cuda.is_available() or launch_mode() != "single":
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise EnvironmentNotReady(
            f"{n} GPUs are visible to one training process. Train on one of them with CUDA_VISIBLE_DEVICES=0 "
            f"fine-tune-llm train ..., or on all {n} with `accelerate launch --config_file "
            f"configs/accelerate/multi_gpu_ddp.yaml --num_processes {n} -m fine_tune_llm train ...`.")


# --- environment check ----------------------------------------------------------------------------------------

def is_local(cfg) -> bool:
    return cfg.base_model == "tiny-gemma" or Path(cfg.base_model).expanduser().exists()


def check_environment(cfg, purpose: str = "train") -> None:
    """Fail in seconds, with one message, when the preset cannot run here. `purpose`: "train", "evaluate" or
    "release"; only training needs one GPU per process."""
    if cfg.requires_cuda and not torch.cuda.is_available():
        raise EnvironmentNotReady(f"preset {cfg.preset!r} ({cfg.base_model}) needs a CUDA GPU: {no_cuda_reason()}. "
                                  f"{OFFLINE_HINT}; `--preset smollm2-135m` trains a real small chat model on CPU.")
    if purpose == "train":
        check_placement()
    check_model_reachable(cfg)


def check_model_reachable(cfg) -> None:
    """The model (or just its tokenizer) is local, in the Hub cache, or reachable on the Hub: else one message."""
    if not is_local(cfg):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            if not _in_hub_cache(cfg.base_model):
                raise EnvironmentNotReady(f"{cfg.base_model} is not a local path and HF_HUB_OFFLINE=1. "
                                          f"{OFFLINE_HINT}.")
        else:
            _check_hub(cfg.base_model)


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even parse is not cached
        return False


def _check_hub(model_id: str) -> None:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - DNS failure, timeout, 401 gated, 404: the fix is the same message
        raise EnvironmentNotReady(
            f"cannot reach {model_id!r} on the Hugging Face Hub ({type(exc).__name__}). Check the network, and for "
            f"gated models accept the licence on the model page and run `hf auth login`. {OFFLINE_HINT}.") from None


def no_cuda_reason() -> str:
    """Why torch sees no GPU, in words that say what to fix: a CPU-only torch, a hidden GPU, a driver CUDA cannot
    start with (too old for this torch's CUDA), or no GPU at all."""
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    error = cuda_init_error()
    if driver_installed() or any(w in error.lower() for w in ("too old", "insufficient", "driver version")):
        major = torch.version.cuda.split(".")[0]
        return (f"an NVIDIA driver is installed but CUDA failed to start ({error or 'no device found'}). "
                f"PyTorch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs driver "
                f"{MIN_DRIVER.get(major, 'a recent enough')} or newer: check `nvidia-smi`, update the driver, or "
                f"install a PyTorch build for an older CUDA")
    return "none is visible (no NVIDIA driver found)"


def cuda_init_error() -> str:
    """The message CUDA's initialization fails with (torch.cuda.is_available() only warns it, once)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - RuntimeError or AssertionError; the text is what we want
        return " ".join(str(exc).split())[:300]
    return ""


def driver_installed() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def visible_gpu_bytes() -> int | None:
    """Total memory of this process's GPU (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
