"""The training job: data -> tokens -> 4-bit model + LoRA -> TRL's SFTTrainer -> adapter in the run directory.

    train(cfg)
      prepare_data     read and check every row (any format), split by prompt group (saved into the run), tokenize
                       with exact masks over every assistant turn
      load_model       4-bit base (model/loading.py) + LoRA on every linear projection
      build_trainer    TRL's SFTTrainer with our guards (train/trainers.py), resuming from the last complete checkpoint
      finish           adapter + tokenizer + generation config, trainer state, metrics CSVs and the loss plot

The main process holds the run directory's lock throughout (run_lock.py): a second training, evaluation or
release of the same run stops at once instead of writing beside it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..config import TrainConfig
from ..data.rows import config_splits
from ..data.tokenized import tokenize_split
from ..errors import DataError, TrainingDiverged
from ..files import replace_folder, replaced
from ..model import hardware
from ..model.generation import save_inference_files
from ..model.hardware import check_environment, resolved
from ..model.loading import add_lora, load_model, load_tokenizer, restore_trainable_dtype
from ..run import ADAPTER_CONFIG_FILE, RunDir, write_config_file
from ..run_lock import hold, is_main_process
from . import checkpoints, rowtrace
from .memory_estimate import refuse_if_too_big
from .progress import use_compact_progress
from .trainers import StopOnSigint, all_ranks, default_callbacks, trainer_class

log = logging.getLogger(__name__)
TOKEN_COLUMNS = ["input_ids", "completion_mask"]


@dataclass
class TrainResult:
    run: RunDir
    train_loss: float | None
    eval_loss: float | None
    global_step: int
    interrupted: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for notebooks and tests
    exported: dict[str, Path] = field(default_factory=dict)  # metrics CSVs and the loss plot

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def adapter_dir(self) -> Path:
        return self.run.adapter_dir


class PreparedData(NamedTuple):
    """The splits (rows) and their tokenized datasets: what training consumes, shown by notebook 02."""

    splits: dict[str, list[dict[str, Any]]]
    tokenized: dict[str, Any]


def split_data(cfg: TrainConfig):
    """Read and check every row, dedupe and split the configured data (the one place a split is made: later stages
    read the run's splits.json). A bad row stops here, before any tokenizer or model loads."""
    return config_splits(cfg)


def tokenize_splits(cfg: TrainConfig, splits, tokenizer) -> PreparedData:
    tokenized = {name: tokenize_split(rows, tokenizer, cfg, name) for name, rows in splits.items()}
    if len(tokenized["train"]) == 0:  # otherwise the Trainer's sampler fails with "num_samples=0"
        why = (f"all {len(splits['train'])} were skipped: their prompts fill max_length={cfg.max_length}; raise "
               f"--max-length" if splits["train"] else f"the split kept none of {sum(map(len, splits.values()))} "
               f"rows; raise --data-samples or lower --val-fraction/--test-fraction")
        raise DataError(f"{cfg.dataset}: no training rows ({why})")
    return PreparedData(splits, tokenized)


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """The configured data split and tokenized with exact masks over every trained assistant turn."""
    return tokenize_splits(cfg, split_data(cfg), tokenizer)


def sft_config(cfg: TrainConfig, run_dir: Path):
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    p = hardware.precision(cfg)  # bf16 on sm_80+ and bf16-native CPUs, fp16 on older GPUs, else fp32 (hardware.resolve_precision)
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
        max_length=None, padding_free=cfg.padding_free, pad_to_multiple_of=cfg.pad_to_multiple_of,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        prediction_loss_only=True, dataloader_num_workers=0, disable_tqdm=False,
    )



def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, run: RunDir | Path, callbacks=()):
    run = RunDir.of(run)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs_dir)  # read by transformers 5's TB callback
    from .answer_loss import wanted

    cls = trainer_class(answer_only_loss=wanted(cfg.loss_impl))
    trainer = cls(model=model, args=sft_config(cfg, run.path), train_dataset=train_ds.select_columns(TOKEN_COLUMNS),
                  eval_dataset=eval_ds.select_columns(TOKEN_COLUMNS), processing_class=tokenizer,
                  callbacks=[*default_callbacks(), *callbacks])
    use_compact_progress(trainer)
    restore_trainable_dtype(trainer.model, cfg)  # TRL casts QLoRA adapters to bf16; fp16/fp32 runs need fp32
    return trainer


def final_losses(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return (train[-1] if train else None), (evals[-1] if evals else None)


def train(cfg: TrainConfig, resume: bool | str | None = None, model=None, tokenizer=None,
          data: PreparedData | None = None) -> TrainResult:
    """Run one fine-tune; resume=None resumes automatically when the run directory has a good checkpoint.

    A notebook may pass what it already built: the tokenizer, the prepared data (prepare_data), the model
    (with or without LoRA)."""
    check_environment(cfg)
    cfg = resolved(cfg)  # dtype "auto" -> what this machine trains in, recorded in config.yaml and the manifest
    refuse_if_too_big(cfg)  # on a GPU: stop before loading any weight when the config cannot fit
    with hold(cfg.output_dir, "training") as run:  # before any heavy work: a second writer stops at once
        return _train(cfg, run, resume, model, tokenizer, data)


def _train(cfg: TrainConfig, run: RunDir, resume, model, tokenizer, data: PreparedData | None) -> TrainResult:
    from transformers import set_seed

    set_seed(cfg.seed)
    splits = split_data(cfg) if data is None else None  # every row checked before anything loads or is written
    tokenizer = tokenizer or load_tokenizer(cfg)
    data = data or tokenize_splits(cfg, splits, tokenizer)
    run.path.mkdir(parents=True, exist_ok=True)
    model = model or load_model(cfg)
    if not hasattr(model, "peft_config"):  # a notebook may wrap it first, to show the LoRA layers before training
        model = add_lora(model, cfg)
    checkpoint = checkpoints.resume_point(run, resume, cfg)
    trace = rowtrace.start(data.tokenized["train"])
    _write_run_files(cfg, run, data, checkpoint)
    with StopOnSigint() as sigint, lora_inputs_uncast(model, cfg):
        trainer = build_trainer(cfg, model, tokenizer, data.tokenized["train"], data.tokenized["validation"], run,
                                callbacks=[sigint.callback()])
        trainer.row_trace = trace
        trainer.train(resume_from_checkpoint=checkpoint)
    result = finish(cfg, trainer, tokenizer, run, interrupted=sigint.requested)
    if trace is not None:
        trace.write(run, trainer.args.process_index)
    return result


def lora_inputs_uncast(model, cfg: TrainConfig):
    """peft casts each LoRA layer's input to the adapter weights' dtype (fp32 adapters on a bf16 base), and the
    Trainer's autocast casts it straight back for the matmul: an activation-sized copy per LoRA layer, forward and
    backward, for the same values. Under autocast (bf16/fp16 runs) the cast is skipped while training: identical
    losses, faster steps (docs/results.md#smollm2-135m-instruct, row ours+lora-cast). fp32 runs keep it."""
    from peft.helpers import disable_input_dtype_casting

    p = hardware.precision(cfg)
    return disable_input_dtype_casting(model, active=p.bf16 or p.fp16)


def _write_run_files(cfg: TrainConfig, run: RunDir, data: PreparedData, checkpoint: str | None) -> None:
    from ..manifest import write_manifest

    if not is_main_process():
        return
    if checkpoint and run.splits_file.is_file():
        run.load_splits()  # a resumed run must see the rows it started with: fails if the data file changed
    else:
        run.save_splits(data.splits, cfg.dataset)
    run.write_config(cfg)
    write_manifest(cfg, run, resumed_from=checkpoint)


def save_adapter(cfg: TrainConfig, trainer, tokenizer, run: RunDir) -> Path:
    """The adapter folder, written whole into RUN/.adapter.partial and then put in place of adapter/: a kill or a
    full disk midway leaves the previous adapter (or none), never half of one."""
    staging, main = run.adapter_staging_dir, trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
    # Every rank calls save_model (the Trainer writes on rank 0 only): under FSDP, gathering the sharded
    # adapter is collective, and a sharded state dict would save nothing at all.
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")

    def write():
        trainer.save_model(str(staging))
        if main:
            (staging / "README.md").unlink(missing_ok=True)  # PEFT's placeholder card; releases write theirs
            shutil.rmtree(staging / "ref", ignore_errors=True)  # the DPO reference: a copy of the SFT adapter
            save_inference_files(tokenizer, trainer.model, staging)
            write_config_file(staging / ADAPTER_CONFIG_FILE, cfg)

    need = checkpoints.expected_bytes(run, trainer.model, adapter_only=True) if main else 0
    checkpoints.save_or_stop(write, staging, need, lambda ok: all_ranks(ok, trainer.args), main, "the adapter")
    return replace_folder(staging, run.adapter_dir) if main else run.adapter_dir


def finish(cfg: TrainConfig, trainer, tokenizer, run: RunDir, interrupted: bool = False) -> TrainResult:
    """Save the adapter (+ tokenizer, generation config, config) and export the metrics."""
    from .tensorboard_export import export_run

    history = trainer.state.log_history
    save_adapter(cfg, trainer, tokenizer, run)
    exported: dict[str, Path] = {}
    if trainer.is_world_process_zero():
        with replaced(run.trainer_state_file) as tmp:
            trainer.state.save_to_json(str(tmp))
        exported = export_run(run, cfg.metrics_dir, cfg.imgs_dir)
    train_loss, eval_loss = final_losses(history)
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingDiverged(f"final training loss is {train_loss}")
    # Accelerate wraps forward in bf16 autocast for mixed precision; unwrap so the returned model computes
    # exactly as the same adapter loaded from disk does.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrainResult(run, train_loss, eval_loss, trainer.state.global_step, interrupted, history, model=model,
                       exported=exported)
