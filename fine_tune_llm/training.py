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

from . import checkpoints
from .chat import build_messages, encode_batch
from .config import TrainConfig
from .data import load_splits
from .errors import TrainingDiverged
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


def tokenize_split(rows: list[dict[str, Any]], tokenizer, cfg: TrainConfig, name: str = "split"):
    """A datasets.Dataset with input_ids and completion_mask; rows whose prompt fills max_length dropped."""
    from datasets import Dataset

    ds = Dataset.from_list(rows) if rows else Dataset.from_dict({k: [] for k in ("row", "question", "answer")})

    def encode(batch):
        prompts = [build_messages(q, cfg.system_prompt) for q in batch["question"]]
        return encode_batch(tokenizer, prompts, batch["answer"], cfg.max_length)

    ds = ds.map(encode, batched=True, batch_size=1000, desc=f"Tokenizing {name}")
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


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[dict[str, list], dict[str, Any]]:
    splits = load_splits(cfg.dataset, cfg.seed, cfg.data_samples, cfg.val_fraction, cfg.test_fraction)
    tokenized = {name: tokenize_split(rows, tokenizer, cfg, name) for name, rows in splits.items()}
    return splits, tokenized


def sft_config(cfg: TrainConfig, run_dir: Path):
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim if cuda or "paged" not in cfg.optim else "adamw_torch",
        bf16=cfg.dtype == "bfloat16", fp16=cfg.dtype == "float16" and cuda, use_cpu=not cuda,
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
    def make(**kwargs):
        from trl import SFTTrainer

        class GuardedSFTTrainer(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                loss = super().training_step(model, inputs, num_items_in_batch)
                # Checked before the optimizer step: the weights and the last checkpoint stay good.
                if not torch.isfinite(loss).all():
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped. The last "
                        f"good checkpoint is kept in {self.args.output_dir}. Lower --learning-rate or check the data.")
                return loss

        return GuardedSFTTrainer(**kwargs)


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, run_dir: Path, callbacks=()):
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")  # read by transformers 5's TB callback
    return SFTTrainerWithGuard.make(
        model=model, args=sft_config(cfg, run_dir), train_dataset=train_ds.select_columns(TOKEN_COLUMNS),
        eval_dataset=eval_ds.select_columns(TOKEN_COLUMNS), processing_class=tokenizer,
        callbacks=[checkpoints.CompletionMarker(), *callbacks])


class StopOnSigint:
    """First Ctrl-C: finish the current step, save a checkpoint and the adapter, then stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.requested = True
            log.warning("Ctrl-C: saving a checkpoint and the adapter after this step (Ctrl-C again to abort)")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. some notebook runners): no handler
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.requested:
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
    model = add_lora(model or load_model(cfg), cfg)
    checkpoint = checkpoints.resume_point(run_dir, resume)
    _write_run_files(cfg, run_dir, checkpoint)
    with StopOnSigint() as sigint:
        trainer = build_trainer(cfg, model, tokenizer, data["train"], data["validation"], run_dir,
                                callbacks=[sigint.callback()])
        trainer.train(resume_from_checkpoint=checkpoint)
    return finish(cfg, trainer, tokenizer, run_dir, interrupted=sigint.requested)


def _write_run_files(cfg: TrainConfig, run_dir: Path, checkpoint: str | None) -> None:
    from .manifest import write_manifest

    if _is_main_process():
        cfg.save(run_dir / "config.yaml")
        write_manifest(cfg, run_dir, resumed_from=checkpoint)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def finish(cfg: TrainConfig, trainer, tokenizer, run_dir: Path, interrupted: bool = False) -> TrainResult:
    """Save the adapter (+ tokenizer, generation config, config) and export the metrics."""
    from .metrics import export_run

    adapter_dir = run_dir / "adapter"
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        trainer.save_model(str(adapter_dir))
        save_inference_files(tokenizer, trainer.model, adapter_dir)
        cfg.save(adapter_dir / "training_config.yaml")
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        export_run(run_dir, cfg.metrics_dir, cfg.imgs_dir, base_model=cfg.base_model)
    train_loss, eval_loss = final_losses(history)
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingDiverged(f"final training loss is {train_loss}")
    return TrainResult(run_dir, adapter_dir, train_loss, eval_loss, trainer.state.global_step, interrupted, history)


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
