"""Answer-only loss: the LM head runs only at positions whose next token is trained on.

Why: Gemma's vocabulary has 256,000 entries, so projecting one position onto it costs 2 * 256k * hidden FLOPs -
about 21% of gemma-2b's forward pass and most of a small model's. Only answer positions carry a loss (the
completion mask), yet TRL's SFTTrainer (1.16) restricts its fused LM head to them only where Triton runs (CUDA,
XPU). Elsewhere it projects every position, also computes the entropy and top-1 of each full distribution for
its logs, and runs its backward as fp32 matmuls: on CPU that head was the largest cost of a step, and
replacing it made steps several times faster with the same loss (docs/results.md#training-throughput,
tests/test_packing.py). Here the model's own forward is asked for logits at the trained positions only
(`logits_to_keep` with a boolean mask, a transformers API, so model-specific logit scaling and softcapping still
apply) and the cross-entropy runs over them in fp32, one chunk of rows at a time, its gradient computed in the
same pass.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# fp32 scratch per chunk of rows: 2**25 floats = 128 MB (128 rows of Gemma's vocabulary). Chunks this size ran
# fastest on CPU (fewer, larger passes; smaller ones paid per-chunk overhead).
CE_CHUNK_ELEMENTS = 2**25


class ChunkedCrossEntropy(torch.autograd.Function):
    """(nll, top1, entropy, mean_logit): per-row negative log-likelihood of `targets` under `logits` [N, V], in fp32,
    one chunk of rows at a time, and whether the target has the highest logit (TRL's token accuracy, from the same
    pass). With `stats=True` also each row's entropy and mean logit (what TRL's preference trainer logs), from the
    same chunks; otherwise those two are empty.

    Same values as `F.cross_entropy(logits.float(), targets, reduction="none")`. The gradient (softmax - onehot)
    is computed in the same pass as the forward, while each chunk is hot, and stored in the logits' dtype; the
    backward only scales it. Faster than F.cross_entropy on the fp32 logits (which holds three fp32 copies), and
    the accuracy comes free instead of a separate argmax (docs/results.md#start-up-and-small-kernels).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, stats: bool = False):
        n, vocab = logits.shape
        chunk = max(1, CE_CHUNK_ELEMENTS // vocab)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        nll = torch.empty(n, dtype=torch.float32, device=logits.device)
        top1 = torch.empty(n, dtype=torch.bool, device=logits.device)
        entropy = torch.empty(n if stats else 0, dtype=torch.float32, device=logits.device)
        mean_logit = torch.empty(n if stats else 0, dtype=torch.float32, device=logits.device)
        target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        buf = torch.empty((min(chunk, n), vocab), dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            x = buf[: e - s]
            x.copy_(logits[s:e])
            row_max = x.amax(-1, keepdim=True)
            if stats:
                mean_logit[s:e] = x.mean(-1)
                centred = x - row_max
                x.copy_(centred).exp_()
            else:
                x.sub_(row_max).exp_()
            total = x.sum(-1, keepdim=True)
            nll[s:e] = (total.log() + row_max).squeeze(1) - target_logit[s:e]
            if stats:  # H = log Z - E_p[z], both relative to the row max
                entropy[s:e] = total.log().squeeze(1) - (x * centred).sum(-1) / total.squeeze(1)
            top1[s:e] = target_logit[s:e] >= row_max.squeeze(1)  # a tie counts as a hit
            if need_grad:  # d nll / d logits = softmax - onehot(target)
                x.div_(total)
                x[torch.arange(e - s, device=x.device), targets[s:e]] -= 1.0
                grad[s:e].copy_(x)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(top1, entropy, mean_logit)
        ctx.used = False
        return nll, top1, entropy, mean_logit

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, _grad_top1=None, _grad_entropy=None, _grad_mean=None):
        if ctx.used:  # the stored gradient is scaled in place: a second backward would be wrong
            raise RuntimeError("ChunkedCrossEntropy supports one backward pass per forward (no retain_graph)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_nll.unsqueeze(1).to(grad.dtype)), None, None


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where labels[b, t + 1] is trained on; targets are those labels, in the
    same row-major order as the positions the model returns for a boolean `logits_to_keep`."""
    next_labels = labels[:, 1:]
    trained = next_labels != -100
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = trained
    return keep, next_labels[trained]


def answer_only_nll(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token nll [n], top-1 hit [n], targets [n]) for a batch with `labels` (-100 = not trained)."""
    keep, targets = answer_positions(inputs["labels"])
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1])
    nll, top1, _, _ = ChunkedCrossEntropy.apply(logits, targets)
    return nll, top1, targets


class AnswerOnlyLossMixin:
    """Mixed into TRL's SFTTrainer ahead of it: same loss value and normalisation as TRL's default negative
    log-likelihood (sum over trained tokens / num_items_in_batch), with the LM head on trained positions only.
    Logs TRL's `mean_token_accuracy` (from the cross-entropy's own pass) but not its `entropy` (a further pass
    over the full vocabulary at every position). Anything else TRL's compute_loss handles (label smoothing,
    DFT loss, custom loss functions, MoE aux loss, sequence parallelism, returned logits) goes to TRL unchanged.
    """

    def _answer_only_applies(self, return_outputs: bool) -> bool:
        args = self.args
        return not (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                    or args.loss_type != "nll" or getattr(self, "aux_loss_enabled", False)
                    or getattr(self.accelerator, "parallelism_config", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._answer_only_applies(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        nll, top1, targets = answer_only_nll(model, inputs)
        denom = targets.numel() if num_items_in_batch is None else num_items_in_batch
        # Clamped like TRL's: a micro-batch without trained tokens contributes a differentiable zero.
        loss = nll.sum() / torch.as_tensor(denom, device=nll.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL does under DDP
        self._log_answer_metrics(mode, top1, inputs)
        return loss

    def _log_answer_metrics(self, mode: str, top1: torch.Tensor, inputs: dict) -> None:
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            n_valid = gather(torch.tensor(top1.numel(), device=top1.device)).sum()
            n_correct = gather(top1.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((n_correct / n_valid).item() if n_valid > 0 else 0.0)
        if mode == "train":  # TRL's `num_tokens`: tokens fed to the model, padding-free or padded
            if "attention_mask" in inputs:
                n_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                n_tokens = gather(torch.tensor(inputs["position_ids"].size(1), device=top1.device)).sum().item()
            self._total_train_tokens += n_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def wanted(loss_impl: str) -> bool:
    """Whether the answer-only loss replaces TRL's; logs which loss "auto" chose and why."""
    answer_only, why = choose(loss_impl)
    if loss_impl == "auto":
        log.info("loss: %s (%s)", "answer-only logits" if answer_only else "TRL's fused Triton LM head", why)
    return answer_only


def choose(loss_impl: str) -> tuple[bool, str]:
    """(answer-only loss?, why). "auto" uses it unless TRL's fused head runs in Triton (CUDA/XPU), where TRL already
    projects only the trained positions, in fused tiles that never hold the logits - and only where Triton can
    build its kernels, since it builds them at the first loss, mid-run."""
    if loss_impl != "auto":
        return loss_impl == "answer-logits", f"loss_impl={loss_impl}"
    from transformers.utils import is_triton_available

    gpu = _gpu_device()
    if gpu is None or not is_triton_available():
        return True, "no CUDA/XPU device" if gpu is None else "Triton not installed"
    ready, why = triton_ready(gpu)
    return not ready, why


def _gpu_device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return None


@functools.cache
def triton_ready(device: str) -> tuple[bool, str]:
    """Whether Triton can build kernels here, and why. Triton compiles a C launcher for every kernel at its first
    launch, with a C compiler and Python's headers: an image without them crashes mid-run, at the first loss.
    Without them, a tiny launch of TRL's own kernel decides (it succeeds when Triton's cache already has it)."""
    missing = triton_build_missing()
    if not missing:
        return True, "C compiler and Python headers present"
    try:
        from trl.trainer.utils import selective_log_softmax

        logits = torch.zeros(2, 8, device=device)
        selective_log_softmax(logits, torch.zeros(2, dtype=torch.long, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure to build or launch means: do not rely on Triton
        return False, (f"Triton cannot build kernels here ({', '.join(missing)} missing; a test launch failed: "
                       f"{type(exc).__name__})")
    return True, f"{', '.join(missing)} missing, but a test launch of TRL's kernel succeeded"


def triton_build_missing() -> list[str]:
    """What Triton's build (triton/runtime/build.py: $CC, else gcc, else clang; Python.h) would not find."""
    import shutil
    import sysconfig

    missing = []
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("C compiler")
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not Path(include, "Python.h").is_file():
        missing.append(f"Python headers ({include}/Python.h)")
    return missing
