"""The SFT trainer and its callbacks: TRL's SFTTrainer plus a divergence guard, completion markers on every
checkpoint, and a clean stop on Ctrl-C / SIGTERM.

Training-only: this module imports TRL, which is slow to import (docs/results.md#start-up-and-small-kernels), so
only `train/sft.py` imports it, and the CLI imports `train.sft` when a training command runs; `fine-tune-llm --help`,
`evaluate` and `release` start without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import signal

import torch
from transformers import TrainerCallback
from trl import DPOTrainer, SFTTrainer

from ..errors import TrainingDiverged
from ..run import RunDir
from . import checkpoints
from .answer_loss import AnswerOnlyLossMixin

log = logging.getLogger(__name__)


def all_ranks(flag: bool, args) -> bool:
    """True only if `flag` holds on every process (one tiny all-reduce; free on a single process)."""
    import torch.distributed as dist

    if getattr(args, "world_size", 1) <= 1 or not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


class TrainingGuards:
    """Mixed in ahead of a TRL trainer: stop before an update when the loss is not finite, resume in the dtypes the
    run trains in, and write no placeholder model card."""

    row_trace = None  # rowtrace.RowTrace when FINE_TUNE_LLM_TRACE_ROWS=1 (tests of data sharding)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # PEFT's load_adapter upcasts bf16 adapter weights to fp32 (autocast_adapter_dtype,
        # https://github.com/huggingface/peft/issues/2421) while TRL trains them in bf16 on a quantized
        # model: keep the dtypes this run trains in, or a resumed run drifts from an uninterrupted one.
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.row_trace is not None:
            self.row_trace.record(inputs, self.state.global_step + 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step: the weights and the last checkpoint stay good. Every rank must
        # agree, or the healthy ranks would wait forever in the next all-reduce.
        if not all_ranks(bool(torch.isfinite(loss).all()), self.args):
            good = checkpoints.last_good_checkpoint(RunDir.of(self.args.output_dir))
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before that "
                f"step's update. Last good checkpoint: {good or 'none yet'}. Lower --learning-rate (and pass "
                f"--no-resume) or check the data.")
        return loss

    def _save_checkpoint(self, model, trial):
        # A full disk while saving: no partial checkpoint left, one message naming the last complete one.
        run, main = RunDir.of(self.args.output_dir), self.is_world_process_zero()
        save = super()._save_checkpoint
        checkpoints.save_or_stop(lambda: save(model, trial), run.checkpoint_dir(self.state.global_step),
                                 checkpoints.expected_bytes(run, self.model) if main else 0,
                                 lambda ok: all_ranks(ok, self.args), main, f"checkpoint-{self.state.global_step}")

    def _run_epoch(self, *args, **kwargs):
        # transformers 5's loop checks max_steps only after a step: resumed from a checkpoint at max_steps (a
        # finished run re-run to save its damaged adapter again) it would train one step more. Train none.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        # TRL writes a placeholder README.md ("fine-tuned version of [None]") into the run directory at every
        # save; the release stage writes the real model card.
        return None


class GuardedSFTTrainer(TrainingGuards, SFTTrainer):
    """TRL's SFTTrainer with the guards."""


class GuardedDPOTrainer(TrainingGuards, DPOTrainer):
    """TRL's DPOTrainer with the guards, fed pairs we tokenized ourselves (train/preference.py): the same chat
    template, one <bos> and answer masks as SFT. TRL 1.16 re-tokenizes text columns and has no path for
    pre-tokenized pairs (its _prepare_dataset reads `chosen` text), so ours are passed through unchanged."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in (dataset.column_names or []):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Reference log-probs already in the data (SimPO's constant offsets, train/preference.py) are used as they are;
        # TRL 1.16 would compute them again and fail on the duplicated columns.
        if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names or []):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


class AnswerOnlyDPOTrainer(GuardedDPOTrainer):
    """GuardedDPOTrainer with the answer-only LM head (train/preference_logps.py): TRL's loss, metrics and loss types
    unchanged, the vocabulary projected at answer positions only. With group_by_length, pairs of similar length
    share a batch (TRL's pairs have no `input_ids` column for transformers' length sampler to read)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from peft import PeftModel

        from .preference_logps import install_answer_only_head

        model = self.model
        install_answer_only_head(model.get_base_model() if isinstance(model, PeftModel) else model)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        data = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    dataset=data, lengths=_pair_lengths(data))

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        lengths = _pair_lengths(eval_dataset)  # longest first: every eval batch of similar lengths, in a fixed order
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _pair_lengths(pairs) -> list[int]:
    """A pair's padded width in TRL's [chosen; rejected] batch: the prompt and its longer answer."""
    return [len(p) + max(len(c), len(r)) for p, c, r in
            zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])]


class AnswerOnlySFTTrainer(AnswerOnlyLossMixin, GuardedSFTTrainer):
    """The answer-only loss (train/answer_loss.py, cfg.loss_impl) over TRL's compute_loss: on CPU, TRL's head scores
    the full vocabulary at every position, so this is the largest speed-up of a step at the same loss
    (docs/results.md#training-throughput, tests/test_packing.py)."""


class CompletionMarker(TrainerCallback):
    """Writes COMPLETE.json into each checkpoint once all of it is on disk (train/checkpoints.py)."""

    def on_step_end(self, args, state, control, **kwargs):
        # A folder for this step already on disk comes from an attempt that died after it: its marker must not
        # vouch for the files this run is about to write over it.
        folder = RunDir.of(args.output_dir).checkpoint_dir(state.global_step)
        if state.is_world_process_zero and folder.is_dir():
            checkpoints.invalidate(folder)
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoints.barrier()  # every rank writes its own rng_state_<rank>.pth: wait for all before vouching
        folder = RunDir.of(args.output_dir).checkpoint_dir(state.global_step)
        main = state.is_world_process_zero

        def vouch():
            if main and folder.is_dir():
                checkpoints.write_marker(folder)

        checkpoints.save_or_stop(vouch, folder, 0, lambda ok: all_ranks(ok, args), main, folder.name)
        return control


class ReturnFreedMemory(TrainerCallback):
    """Every `every` optimizer steps and after each evaluation, hands the memory the C allocator holds free back to
    the OS (glibc's malloc_trim). A CPU step frees activations of a different shape every batch, and glibc keeps the
    freed pages, so a CPU job's RSS climbs step after step without it. Every 10 steps costs almost nothing; after
    every step it costs much more (the pages given back are faulted in again, slowly in a VM). Measured:
    docs/results.md#where-the-memory-goes. A no-op where there is no glibc (macOS, musl)."""

    def __init__(self, every: int = 10):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            release_freed_memory()
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        release_freed_memory()
        return control


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> bool:
    """malloc_trim(0): True when glibc returned memory to the OS."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def default_callbacks() -> list[TrainerCallback]:
    """The callbacks every stage's trainer runs with: completion markers, and on CPU the freed-memory trim."""
    callbacks: list[TrainerCallback] = [CompletionMarker()]
    if not torch.cuda.is_available():  # host memory is what a CPU run is short of; a GPU run's peak is VRAM
        callbacks.append(ReturnFreedMemory())
    return callbacks


class StopOnSigint:
    """First Ctrl-C (or SIGTERM, what schedulers and spot preemption send): finish the current step, save a
    checkpoint, the adapter and the metrics, then stop. Second Ctrl-C: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: saving a checkpoint and the adapter after this step (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def callback(self) -> SigintCallback:
        return SigintCallback(self)


class SigintCallback(TrainerCallback):
    """Stops every rank at the same step once any of them got the signal."""

    def __init__(self, stop: StopOnSigint):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        # Under DDP the signal reaches ranks at different moments: stop together, at the same step.
        if not all_ranks(not self.stop.requested, args):
            self.stop.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control


def trainer_class(answer_only_loss: bool) -> type[GuardedSFTTrainer]:
    return AnswerOnlySFTTrainer if answer_only_loss else GuardedSFTTrainer


__all__ = ["AnswerOnlyDPOTrainer", "AnswerOnlySFTTrainer", "CompletionMarker", "GuardedDPOTrainer", "GuardedSFTTrainer", "ReturnFreedMemory",
           "SigintCallback", "StopOnSigint", "TrainingGuards", "all_ranks", "default_callbacks", "release_freed_memory",
           "trainer_class"]
