"""The preference stage: continue an SFT run's adapter on (chosen, rejected) pairs with TRL's DPOTrainer.

    train_preference(cfg)              cfg from stages.preference_config(SFT_RUN, ...)
      the SFT run's saved split        no test question is trained on by either stage
      encode_pairs                     the SFT template and masks (the final answer; a multi-turn prompt's earlier
                                       turns as context), one <bos>, control strings stripped
      4-bit base + the SFT adapter     trainable, under PEFT's name "default"
      reference_columns                the reference policy is the SFT model (the adapter before the first step):
                                       its log-probs, computed once in a forward-only pass sorted by length, or read
                                       back from the run when a resumed stage already computed them
      AnswerOnlyDPOTrainer             TRL's DPOTrainer and loss, with the LM head at answer positions only and
                                       length-grouped batches (train/preference_logps.py)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..config import TrainConfig
from ..data.formats import with_answer
from ..data.rows import check_pairs
from ..data.tokenized import encode_examples
from ..errors import DataError
from ..model.hardware import check_environment, resolved
from ..model.loading import (
    check_adapter_folder,
    load_model,
    load_tokenizer,
    prepare_for_training,
    restore_trainable_dtype,
)
from ..run import RunDir
from ..run_lock import hold, is_main_process
from . import answer_loss, checkpoints
from .lineage import parent_of, record_parent
from .memory_estimate import refuse_if_too_big
from .preference_logps import cached_reference, pair_logps, with_reference_columns
from .progress import use_compact_progress
from .sft import TrainResult, finish, lora_inputs_uncast
from .trainers import (
    AnswerOnlyDPOTrainer,
    GuardedDPOTrainer,
    StopOnSigint,
    default_callbacks,
    release_freed_memory,
)

log = logging.getLogger(__name__)
PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
REF_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]  # supplied by the data for SimPO only


def encode_pairs(rows: list[dict[str, Any]], tokenizer, cfg: TrainConfig, name: str = "pairs"):
    """prompt_ids / chosen_ids / rejected_ids, split where the final answer starts: the prompt holds every earlier
    turn (a multi-turn prompt's earlier answers are context here), the answers are the tokens SFT trained on for
    the final turn. Pairs where either conversation would be cut at max_length are dropped (a truncated answer would
    be judged without its end), and counted in the log."""
    from datasets import Dataset

    rejected_rows = [{**r, "messages": with_answer(r, r["rejected"])} for r in rows]
    chosen = encode_examples(tokenizer, rows, cfg.max_length, cfg.system_prompt, train_on="last")
    rejected = encode_examples(tokenizer, rejected_rows, cfg.max_length, cfg.system_prompt, train_on="last")
    out: dict[str, list] = {"row": [], **{c: [] for c in PAIR_COLUMNS}}
    for row, c_ids, c_mask, c_ok, r_ids, r_mask, r_ok in zip(
            rows, chosen["input_ids"], chosen["completion_mask"], chosen["status"], rejected["input_ids"],
            rejected["completion_mask"], rejected["status"]):
        if c_ok != "ok" or r_ok != "ok":
            continue
        start = c_mask.index(1)
        out["row"].append(row["row"])
        out["prompt_ids"].append(c_ids[:start])
        out["chosen_ids"].append(c_ids[start:])
        out["rejected_ids"].append(r_ids[r_mask.index(1):])
    if len(out["row"]) < len(rows):
        log.warning("%s: dropped %d pair(s) whose prompt and answer do not fit max_length=%d", name,
                    len(rows) - len(out["row"]), cfg.max_length)
    return Dataset.from_dict(out)


def simpo_offsets(pairs, cfg: TrainConfig):
    """SimPO through DPOTrainer's length-normalized sigmoid loss ("sigmoid_norm", which divides each answer's
    log-ratio by its token count): with reference log-probs 0 for the chosen answer and -(gamma/beta) x length
    for the rejected one, its loss is exactly SimPO's -log sigmoid(beta/|c| log p(c) - beta/|r| log p(r) - gamma).
    No reference model is run at all."""
    offset = cfg.simpo_gamma / cfg.beta
    return pairs.add_column("ref_chosen_logps", [0.0] * len(pairs)).add_column(
        "ref_rejected_logps", [-offset * len(r) for r in pairs["rejected_ids"]])


def dpo_config(cfg: TrainConfig, run: RunDir):
    import torch
    from trl import DPOConfig

    from ..model.hardware import precision

    cuda = torch.cuda.is_available()
    p = precision(cfg)
    return DPOConfig(
        output_dir=str(run.path), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, optim=cfg.optim if cuda or "paged" not in cfg.optim else "adamw_torch",
        bf16=p.bf16, fp16=p.fp16, use_cpu=not cuda, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, report_to=["tensorboard"],
        loss_type=["sigmoid_norm" if cfg.loss_type == "simpo" else cfg.loss_type], beta=cfg.beta, max_length=None,
        precompute_ref_log_probs=True, pad_to_multiple_of=cfg.pad_to_multiple_of,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataloader_num_workers=0, disable_tqdm=False, ddp_find_unused_parameters=False,
    )


def load_policy(cfg: TrainConfig, sft: RunDir):
    """The 4-bit base prepared as SFT prepared it, with the SFT adapter trainable under PEFT's "default" name."""
    from peft import PeftModel

    from ..model.loading import guard_cpu_4bit

    check_adapter_folder(sft.adapter_dir, sft.adapter_hint())
    model = prepare_for_training(load_model(cfg), cfg)
    # autocast_adapter_dtype=False: keep the adapter in the dtype SFT trained it in (peft#2421)
    model = PeftModel.from_pretrained(model, str(sft.adapter_dir), is_trainable=True, autocast_adapter_dtype=False)
    guard_cpu_4bit(model)
    return model


def prepare_pairs(cfg: TrainConfig, run: RunDir, tokenizer, splits=None) -> dict[str, Any]:
    """The SFT run's train and validation rows (its saved split), checked as pairs and tokenized."""
    splits = splits if splits is not None else run.load_splits()
    check_split_pairs(cfg, splits)
    data = {name: encode_pairs(splits[name], tokenizer, cfg, name) for name in ("train", "validation")}
    if cfg.loss_type == "simpo":
        data = {name: simpo_offsets(ds, cfg) for name, ds in data.items()}
    if len(data["train"]) == 0:
        raise DataError(f"{cfg.dataset}: no training pairs fit max_length={cfg.max_length}")
    return data


def check_split_pairs(cfg: TrainConfig, splits) -> None:
    """Every train and validation row must be a usable pair; the error says why not, naming the data's format."""
    from ..data.formats import DataFormat

    fmt = DataFormat.from_record(getattr(splits, "summary", None))
    for name in ("train", "validation"):
        check_pairs(splits[name], cfg.dataset, fmt)


def train_preference(cfg: TrainConfig, resume: bool | str | None = None) -> TrainResult:
    """Run the dpo stage; resume=None resumes automatically when the run directory has a good checkpoint."""
    check_environment(cfg)
    cfg = resolved(cfg)
    refuse_if_too_big(cfg)
    with hold(cfg.output_dir, "preference training") as run:  # one writer per run directory (run_lock.py)
        return _train_preference(cfg, run, RunDir.of(cfg.sft_run), resume)


def _train_preference(cfg: TrainConfig, run: RunDir, sft: RunDir, resume: bool | str | None) -> TrainResult:
    from transformers import set_seed

    if run.parent_file.is_file():
        parent_of(run)  # refuses an SFT run whose adapter changed since this stage started from it
        splits = run.load_splits()
    else:  # rows without a usable rejected answer stop the stage before it writes anything
        splits = sft.load_splits()
        check_split_pairs(cfg, splits)
        if is_main_process():
            record_parent(run, sft)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    data = prepare_pairs(cfg, run, tokenizer, splits)
    checkpoint = checkpoints.resume_point(run, resume, cfg)
    if is_main_process():
        from ..manifest import write_manifest

        run.write_config(cfg)
        write_manifest(cfg, run, resumed_from=checkpoint, sft_run=str(sft.path))
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs_dir)  # read by transformers 5's TB callback
    model = load_policy(cfg, sft)
    if cfg.loss_type != "simpo":  # SimPO has no reference policy (simpo_offsets)
        data = reference_columns(cfg, run, model, tokenizer, data)
    args = dpo_config(cfg, run)
    if not len(data["validation"]):
        args.eval_strategy = "no"  # val_fraction 0: nothing to evaluate on
    trainer_class = AnswerOnlyDPOTrainer if answer_loss.wanted(cfg.loss_impl) else GuardedDPOTrainer
    with StopOnSigint() as sigint, lora_inputs_uncast(model, cfg):
        trainer = trainer_class(
            model=model, ref_model=None, args=args, train_dataset=_columns(data["train"]),
            eval_dataset=_columns(data["validation"]) if len(data["validation"]) else None, processing_class=tokenizer,
            callbacks=[*default_callbacks(), sigint.callback()])
        use_compact_progress(trainer)
        restore_trainable_dtype(trainer.model, cfg)  # DPOTrainer casts QLoRA adapters to bf16 as SFTTrainer does
        trainer.train(resume_from_checkpoint=checkpoint)
    return finish(cfg, trainer, tokenizer, run, interrupted=sigint.requested)


def reference_columns(cfg: TrainConfig, run: RunDir, model, tokenizer, data: dict[str, Any]) -> dict[str, Any]:
    """The pairs with the reference policy's log-probs (the SFT adapter as loaded, before any step): computed in a
    forward-only pass, under the autocast training uses, or read back from the run when a resumed stage has them."""
    import torch

    from ..model.hardware import precision
    from .lineage import adapter_hash

    p = precision(cfg)
    autocast_dtype = torch.bfloat16 if p.bf16 else torch.float16 if p.fp16 else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reference = {"sft_adapter_sha256": adapter_hash(RunDir.of(cfg.sft_run)), "base_model": cfg.base_model,
                 "dtype": cfg.dtype, "quantization": cfg.quantization}

    def compute(name: str, pairs) -> dict[str, list[float]]:
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None), \
                lora_inputs_uncast(model, cfg):
            logps = pair_logps(model, pairs, pad_id, desc=f"reference log-probs ({name})",
                               pad_to=cfg.pad_to_multiple_of)
        release_freed_memory()  # the pass's activations, of many shapes, would stay in glibc's heap for training
        return logps

    t0 = time.time()
    was_training = model.training
    model.eval()  # the reference policy as it scores: no dropout
    try:
        logps, reused = cached_reference(run, data, reference, compute)
    finally:
        model.train(was_training)
    n = sum(len(d) for d in data.values())
    log.info("reference log-probs of %d pairs %s in %.0f s", n,
             f"read back from {run.reference_logps_file.name}" if reused else "computed", time.time() - t0)
    return {name: with_reference_columns(pairs, logps[name]) if len(pairs) else pairs for name, pairs in data.items()}


def _columns(pairs):
    return pairs.select_columns([c for c in PAIR_COLUMNS + REF_COLUMNS if c in pairs.column_names])


__all__ = ["check_split_pairs", "encode_pairs", "load_policy", "prepare_pairs", "reference_columns", "train_preference"]


