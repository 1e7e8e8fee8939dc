"""The training job: data -> tokens -> 4-bit model + LoRA -> TRL's SFTTrainer -> adapter in the run directory."""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, rowtrace
from .chat import build_messages, encode_batch
from .config import TrainConfig
from .data import load_splits
from .errors import DataError, TrainingDiverged
from .modeling import add_lora, check_environment, load_model, load_tokenizer

log = logging.getLogger(__name__)
TOKEN_COLUMNS = ["input_ids", "completion_mask"]


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    train_loss: float | None
    eval_loss: float | None
    global_step: int
    interrupted: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for notebooks and tests


def tokenize_split(rows: list[dict[str, Any]], tokenizer, cfg: TrainConfig, name: str = "split"):
    """A datasets.Dataset with input_ids and completion_mask; rows whose prompt fills max_length dropped."""
    from datasets import Dataset

    ds = Dataset.from_list(rows) if rows else Dataset.from_dict({k: [] for k in ("row", "question", "answer")})

    def encode(batch):
        prompts = [build_messages(q, cfg.system_prompt) for q in batch["question"]]
        return encode_batch(tokenizer, prompts, batch["answer"], cfg.max_length)

    # An explicit fingerprint: otherwise datasets hashes `encode` by pickling everything it closes over, the
    # tokenizer included (34 MB of vocabulary for Gemma): preparing the 9,846 real rows took 33.5 s, now 7 s.
    ds = ds.map(encode, batched=True, batch_size=1000, desc=f"Tokenizing {name}",
                new_fingerprint=_encode_fingerprint(ds, tokenizer, cfg))
    if len(ds) == 0:
        return ds
    status = ds["status"]
    too_long = [r for r, s in zip(ds["row"], status) if s == "too_long"]
    n_trunc = status.count("truncated")
    if too_long:
        log.warning("%s: skipped %d row(s) whose prompt alone fills max_length=%d (rows %s)", name, len(too_long),
                    cfg.max_length, ", ".join(map(str, too_long[:10])))
        ds = ds.filter(lambda s: s != "too_long", input_columns="status")
    if n_trunc:
        log.warning("%s: %d answer(s) truncated at max_length=%d", name, n_trunc, cfg.max_length)
    return ds


def _encode_fingerprint(ds, tokenizer, cfg: TrainConfig) -> str:
    """Names the tokenized dataset by what determines it: the input rows, tokenizer, template and settings."""
    import hashlib

    key = [ds._fingerprint, tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, cfg.max_length,
           cfg.system_prompt, "encode_batch-v1"]
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[dict[str, list], dict[str, Any]]:
    splits = load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction)
    tokenized = {name: tokenize_split(rows, tokenizer, cfg, name) for name, rows in splits.items()}
    if len(tokenized["train"]) == 0:  # otherwise the Trainer's sampler fails with "num_samples=0"
        why = (f"all {len(splits['train'])} were skipped: their prompts fill max_length={cfg.max_length}; raise "
               f"--max-length" if splits["train"] else f"the split kept none of {sum(map(len, splits.values()))} "
               f"rows; raise --data-samples or lower --val-fraction/--test-fraction")
        raise DataError(f"{cfg.dataset}: no training rows ({why})")
    return splits, tokenized


def sft_config(cfg: TrainConfig, run_dir: Path):
    from trl import SFTConfig

    from .hardware import precision

    cuda = torch.cuda.is_available()
    p = precision(cfg)  # bf16 on sm_80+ and CPU, fp16 on older GPUs (hardware.resolve_precision)
    return SFTConfig(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim if cuda or "paged" not in cfg.optim else "adamw_torch",
        bf16=p.bf16, fp16=p.fp16, use_cpu=not cuda,
        # Every LoRA weight gets a gradient each step: searching the graph for unused ones costs DDP time.
        ddp_find_unused_parameters=False,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, report_to=["tensorboard"],
        # Rows are truncated at tokenization (ours keeps the answer mask exact); TRL need not truncate again.
        max_length=None, padding_free=cfg.padding_free, completion_only_loss=True,
        prediction_loss_only=True, dataloader_num_workers=0, disable_tqdm=False,
    )


class SFTTrainerWithGuard:
    """Built lazily so importing this module does not import TRL (18 s cold)."""

    @staticmethod
    def make(answer_only_loss: bool = False, **kwargs):
        from trl import SFTTrainer

        from .fast_loss import AnswerOnlyLossMixin

        # The answer-only loss (fast_loss.py, cfg.loss_impl) overrides TRL's compute_loss: 3.7x faster steps on
        # CPU than TRL's fused head, same loss (benchmarks/train_throughput.py, tests/test_packing.py).
        bases = (AnswerOnlyLossMixin, SFTTrainer) if answer_only_loss else (SFTTrainer,)

        class GuardedSFTTrainer(*bases):
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
                # Checked before the optimizer step: the weights and the last checkpoint stay good. Every rank
                # must agree, or the healthy ranks would wait forever in the next all-reduce.
                if not all_ranks(bool(torch.isfinite(loss).all()), self.args):
                    good = checkpoints.last_good_checkpoint(Path(self.args.output_dir))
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before "
                        f"that step's update. Last good checkpoint: {good or 'none yet'}. Lower --learning-rate "
                        f"(and pass --no-resume) or check the data.")
                return loss

        return GuardedSFTTrainer(**kwargs)


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, run_dir: Path, callbacks=()):
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")  # read by transformers 5's TB callback
    from .fast_loss import wanted

    return SFTTrainerWithGuard.make(
        answer_only_loss=wanted(cfg.loss_impl),
        model=model, args=sft_config(cfg, run_dir), train_dataset=train_ds.select_columns(TOKEN_COLUMNS),
        eval_dataset=eval_ds.select_columns(TOKEN_COLUMNS), processing_class=tokenizer,
        callbacks=[checkpoints.CompletionMarker(), *callbacks])


def all_ranks(flag: bool, args) -> bool:
    """True only if `flag` holds on every process (one tiny all-reduce; free on a single process)."""
    import torch.distributed as dist

    if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


class StopOnSigint:
    """First Ctrl-C (or SIGTERM, what schedulers and spot preemption send): finish the current step, save a
    checkpoint, the adapter and the metrics, then stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.requested = True
            log.warning("%s: saving a checkpoint and the adapter after this step (Ctrl-C again to abort)",
                        signal.Signals(signum).name)

        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                # Under DDP the signal reaches ranks at different moments: stop together, at the same step.
                if not all_ranks(not outer.requested, args):
                    outer.requested = True
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return _Cb()


def final_losses(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return (train[-1] if train else None), (evals[-1] if evals else None)


def train(cfg: TrainConfig, resume: bool | str | None = None, model=None, tokenizer=None) -> TrainResult:
    """Run one fine-tune; resume=None resumes automatically when the run directory has a good checkpoint."""
    from transformers import set_seed

    check_environment(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    tokenizer = tokenizer or load_tokenizer(cfg)
    _, data = prepare_data(cfg, tokenizer)
    model = model or load_model(cfg)
    if not hasattr(model, "peft_config"):  # a notebook may wrap it first, to show the LoRA layers before training
        model = add_lora(model, cfg)
    checkpoint = checkpoints.resume_point(run_dir, resume, cfg)
    trace = rowtrace.start(data["train"])
    _write_run_files(cfg, run_dir, checkpoint)
    with StopOnSigint() as sigint:
        trainer = build_trainer(cfg, model, tokenizer, data["train"], data["validation"], run_dir,
                                callbacks=[sigint.callback()])
        trainer.row_trace = trace
        trainer.train(resume_from_checkpoint=checkpoint)
    result = finish(cfg, trainer, tokenizer, run_dir, interrupted=sigint.requested)
    if trace is not None:
        trace.write(run_dir, trainer.args.process_index)
    return result


def _write_run_files(cfg: TrainConfig, run_dir: Path, checkpoint: str | None) -> None:
    from .manifest import write_manifest

    if is_main_process():
        cfg.save(run_dir / "config.yaml")
        write_manifest(cfg, run_dir, resumed_from=checkpoint)


def is_main_process() -> bool:
    """Rank 0, or a single process. Read from the launcher's environment: a PartialState() made before the
    Trainer's own reports one process under torchrun on CPU, and every rank would write the run files."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    return True


def finish(cfg: TrainConfig, trainer, tokenizer, run_dir: Path, interrupted: bool = False) -> TrainResult:
    """Save the adapter (+ tokenizer, generation config, config) and export the metrics."""
    from .metrics import export_run

    adapter_dir = run_dir / "adapter"
    history = trainer.state.log_history
    # Every rank calls save_model (the Trainer writes on rank 0 only): under FSDP, gathering the sharded
    # adapter is collective, and a sharded state dict would save nothing at all.
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        save_inference_files(tokenizer, trainer.model, adapter_dir)
        cfg.save(adapter_dir / "training_config.yaml")
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        export_run(run_dir, cfg.metrics_dir, cfg.imgs_dir, base_model=cfg.base_model)
    train_loss, eval_loss = final_losses(history)
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingDiverged(f"final training loss is {train_loss}")
    # Accelerate wraps forward in bf16 autocast for mixed precision; unwrap so the returned model computes
    # exactly as the same adapter loaded from disk does.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrainResult(run_dir, adapter_dir, train_loss, eval_loss, trainer.state.global_step, interrupted, history,
                       model=model)


def save_inference_files(tokenizer, model, out: Path) -> None:
    """Tokenizer with its chat template, and a generation config that stops at the end of the turn."""
    tokenizer.save_pretrained(str(out))
    generation_config(tokenizer, getattr(model, "generation_config", None)).save_pretrained(str(out))


def generation_config(tokenizer, base=None):
    """Stop on <eos> and on the template's end-of-turn token (gemma-2b-it's own config lists only <eos>)."""
    from transformers import GenerationConfig

    from .chat import turn_end

    gen = GenerationConfig(**(base.to_diff_dict() if base is not None else {}))
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(turn_end(tokenizer))]
    gen.eos_token_id = sorted({i for i in ids if i is not None})
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return gen
