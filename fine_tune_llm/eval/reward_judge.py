"""A reward model trained on the run's own training pairs: a judge of generated answers that needs no other model.

    judge = reward_judge(RUN)                  cached in RUN/reward_judge/ (trained once; retrained when the run's
                                               train split, its base model or the options change)
    judge.record["heldout"]                    its accuracy on the run's held-out test pairs, raw and length-matched
    judge.rewards(prompts, answers)            one reward per answer (judge_scores.score_generations builds on it)

The judge is the run's base model with a one-output sequence-classification head and a LoRA adapter, trained with
TRL's RewardTrainer (Bradley-Terry loss: reward(chosen) > reward(rejected)) on the train split's (question, chosen,
rejected) rows, rendered through the run's chat template (reward_pairs.py). Both answers of a training pair are cut
to the same token length, strictly inside both: in a dataset whose chosen answer is nearly always the longer, a
judge shown whole answers learns "longer is better" and would reward any stage that merely lengthens its answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..data import splits as saved_splits
from ..errors import DataError
from ..files import read_json, replace_folder, write_json
from ..model import hardware
from ..model.loading import (
    check_adapter_folder,
    check_model_files,
    guard_cpu_4bit,
    load_tokenizer,
    model_device,
    model_source,
    num_hidden_layers,
    prepare_for_training,
    quantization_config,
    torch_dtype,
)
from ..run import RunDir
from . import reward_pairs as rp
from .scoring import bootstrap_ci

log = logging.getLogger(__name__)
FORMAT = 1  # judge.json's layout; a judge saved in another format is retrained
JUDGE_FILE = "judge.json"
TRAIN_CUT = "inside"  # where training pairs are cut (reward_pairs.py): strictly inside both answers
SCORE_DTYPE = "float32"  # as evaluation: a reward must not depend on the batch it was computed in


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class JudgeOptions:
    """How the judge is trained. The defaults are CPU-sized (the top blocks of a small base, minutes on two cores);
    gpu() is the full recipe. Each field's help says why its default is what it is."""

    seed: int = _opt(0, "Fixed: the same run and options give the same judge, so a cached judge stands for a "
                        "retrained one.")
    max_pairs: int | None = _opt(None, "Training pairs drawn from the train split (None: all): a sample of a few "
                                       "hundred left SmolLM2's judge far below the goal with length removed, all "
                                       "of them met it (docs/results.md#reward-model-judge); trained once per run.")
    max_answer_tokens: int = _opt(128, "Cap on the answer tokens the judge reads; pairs are cut to the shorter "
                                       "answer anyway, so this bounds only a scored answer's cost.")
    epochs: float = _opt(1.0, "One pass: the content signal is learned early, and more passes start to memorize "
                              "the training questions.")
    learning_rate: float = _opt(2e-4, "LoRA's usual rate: the head and adapter start from scratch and see few "
                                      "steps.")
    lora_r: int = _opt(16, "Rank of the adapter: a yes/no judgement of tone needs little capacity.")
    lora_layers: int | None = _opt(15, "Adapt only the top N blocks (None: every block): half of SmolLM2's 30, "
                                       "so the backward stops half-way down, as the CPU training recipe does.")
    batch_size: int = _opt(8, "Pairs per step: each pair is two sequences, so a step reads twice as many.")
    center_rewards: float = _opt(0.01, "TRL's reward-centering penalty: keeps rewards near 0, so a mean reward "
                                       "reads against 0 and runs stay comparable.")
    max_test_pairs: int | None = _opt(None, "Held-out pairs the accuracy is measured on (None: the whole test "
                                            "split, for the tightest interval).")

    @classmethod
    def cpu(cls) -> JudgeOptions:
        """The CPU default (the dataclass defaults): every pair, the top blocks adapted, shorter answers."""
        return cls()

    @classmethod
    def gpu(cls) -> JudgeOptions:
        """The full recipe: every training pair, every block, longer answers, larger batches."""
        return cls(max_pairs=None, max_answer_tokens=256, epochs=1.0, lora_layers=None, batch_size=16)

    @classmethod
    def for_machine(cls) -> JudgeOptions:
        return cls.gpu() if torch.cuda.is_available() else cls.cpu()

    def help(self) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(self)}


@dataclass
class RewardJudge:
    """A trained judge, ready to score: the classifier, its tokenizer, and what judge.json records (its fingerprint,
    options, held-out accuracy, sizes and seconds)."""

    model: Any
    tokenizer: Any
    options: JudgeOptions
    system_prompt: str | None
    record: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16

    def __post_init__(self):
        self.end = rp.end_ids(self.tokenizer)
        self.pad_id = rp.judge_pad_id(self.tokenizer)

    def answers(self, prompts: Sequence[str | list[dict[str, str]]], answers: Sequence[str]) -> list[rp.Answer]:
        examples = [rp.example_of(p, a, n) for n, (p, a) in enumerate(zip(prompts, answers), start=1)]
        return rp.encode_answers(self.tokenizer, examples, self.system_prompt, self.end)

    def rewards(self, prompts: Sequence[str | list[dict[str, str]]], answers: Sequence[str]) -> list[float]:
        """One reward per (prompt, answer), each answer read whole (up to max_answer_tokens)."""
        encoded = self.answers(prompts, answers)
        return self.score([rp.whole(a, self.options.max_answer_tokens, self.end) for a in encoded])

    def score(self, sequences: Sequence[list[int]]) -> list[float]:
        return rewards_of(self.model, sequences, self.pad_id, self.batch_size)


@torch.inference_mode()
def rewards_of(model, sequences: Sequence[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The classifier's scalar output for each token sequence, in input order (batches filled longest-first,
    padded right; the head reads the last token that is not padding: the end-of-turn)."""
    if any(pad_id in s for s in sequences):
        raise DataError(f"a sequence holds the padding id {pad_id}: the judge could not find where it ends")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [0.0] * len(sequences)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            attention[row, :len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        for i, value in zip(idx, logits[:, 0].float().cpu().tolist()):
            out[i] = value
    return out


# --- inputs and cache -------------------------------------------------------------------------------------------

def judge_inputs(run: RunDir, cfg: TrainConfig, options: JudgeOptions) -> dict[str, Any]:
    """Everything the judge depends on: the saved splits' hashes (read from splits.json, without the data file),
    the base model, how prompts are rendered, and the options. Any change retrains it."""
    record = saved_splits.read_record(run.splits_file, run.rebuild_hint())
    splits = record["splits"]
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{run.splits_file}: the run's saved split has no train or no test split to train and "
                        f"check a judge on")
    return {"format": FORMAT, "train_sha256": splits["train"]["sha256"], "test_sha256": splits["test"]["sha256"],
            "base_model": cfg.base_model, "gguf_file": cfg.gguf_file, "system_prompt": cfg.system_prompt,
            "quantization": cfg.quantization, "target_modules": list(cfg.target_modules),
            "options": dataclasses.asdict(options)}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def reward_judge(run: RunDir | str | Path, options: JudgeOptions | None = None, retrain: bool = False,
                 progress: bool = True) -> RewardJudge:
    """The run's judge: loaded from RUN/reward_judge/ when its fingerprint matches, else trained, checked on the
    held-out pairs and saved there (whole or not at all). The caller holds the run's lock (run_lock.hold)."""
    run = RunDir.of(run)
    cfg = run.read_config()
    options = options or JudgeOptions.for_machine()
    inputs = judge_inputs(run, cfg, options)
    if not retrain:
        cached = load_judge(run, cfg, fingerprint(inputs))
        if cached is not None:
            return cached
    return train_judge(run, cfg, options, inputs, progress)


def load_judge(run: RunDir, cfg: TrainConfig, want: str | None = None) -> RewardJudge | None:
    """The saved judge, or None when there is none, it was made from other inputs (`want`: their fingerprint), or
    a file of it is damaged (it is a cache: the caller trains it again)."""
    folder = run.reward_judge_dir
    record = read_json(folder / JUDGE_FILE)
    if record is None or record.get("format") != FORMAT or (want is not None and record.get("fingerprint") != want):
        if folder.exists():
            log.info("reward judge in %s was made from other inputs: training it again", folder)
        return None
    try:
        check_adapter_folder(folder, "")
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not reported as the run's fault
        log.warning("reward judge in %s is damaged (%s): training it again", folder, exc)
        return None
    options = JudgeOptions(**record["options"])
    model, tokenizer = load_classifier(cfg, options, adapter=folder)
    return RewardJudge(model, tokenizer, options, cfg.system_prompt, record)


# --- the model --------------------------------------------------------------------------------------------------

def load_classifier(cfg: TrainConfig, options: JudgeOptions, adapter: Path | None = None, train: bool = False):
    """The run's base as a one-output sequence classifier (quantized as the run is), with a new LoRA adapter
    (train=True) or a saved one. Scoring computes in float32, as evaluation does; training in the run's dtype."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(cfg)
    run_cfg = cfg if train else dataclasses.replace(cfg, dtype=SCORE_DTYPE)
    source, kwargs = model_source(cfg)
    check_model_files(source)
    qconfig = quantization_config(run_cfg) if cfg.quantization != "none" else None
    torch.manual_seed(options.seed)  # the new head's weights come from the judge's seed
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch_dtype(run_cfg), quantization_config=qconfig,
        device_map=hardware.device_map(), attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs)
    model.config.pad_token_id = rp.judge_pad_id(tokenizer)
    guard_cpu_4bit(model)
    if train:
        model = with_new_adapter(model, cfg, options)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        guard_cpu_4bit(model)
        model.eval()
    return model, tokenizer


def with_new_adapter(model, cfg: TrainConfig, options: JudgeOptions):
    """LoRA on the run's target modules of the top `lora_layers` blocks; PEFT trains the new head whole
    (task SEQ_CLS puts the `score` layer in modules_to_save, saved with the adapter)."""
    from peft import LoraConfig, get_peft_model

    layers = num_hidden_layers(model)
    top = (list(range(layers - options.lora_layers, layers))
           if options.lora_layers and layers and options.lora_layers < layers else None)
    lora = LoraConfig(r=options.lora_r, lora_alpha=2 * options.lora_r, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.target_modules), task_type="SEQ_CLS", layers_to_transform=top)
    model = get_peft_model(prepare_for_training(model, cfg), lora)
    guard_cpu_4bit(model)
    return model


# --- training ---------------------------------------------------------------------------------------------------

def pair_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Rows with a rejected answer, at most `limit` of them, drawn with the judge's seed (not the file's order)."""
    pairs = [r for r in rows if r.get("rejected") is not None]
    if limit is not None and len(pairs) > limit:
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


def encode_pairs(tokenizer, rows: list[dict[str, Any]], system_prompt: str | None,
                 end: list[int]) -> tuple[list[rp.Answer], list[rp.Answer]]:
    """Each row's chosen and rejected final answers, with their (shared) prompt."""
    from ..data.formats import with_answer

    rejected = [{**r, "messages": with_answer(r, r["rejected"])} for r in rows]
    return (rp.encode_answers(tokenizer, rows, system_prompt, end),
            rp.encode_answers(tokenizer, rejected, system_prompt, end))


def train_dataset(tokenizer, rows: list[dict[str, Any]], cfg: TrainConfig, options: JudgeOptions):
    """TRL's pre-tokenized preference format: chosen_ids / rejected_ids, both answers cut to the same length,
    strictly inside both (reward_pairs.py: cut at the shorter one's end, its clean ending would give it away)."""
    from datasets import Dataset

    end = rp.end_ids(tokenizer)
    chosen, rejected = encode_pairs(tokenizer, rows, cfg.system_prompt, end)
    c, r = rp.pair_sequences(chosen, rejected, TRAIN_CUT, options.max_answer_tokens, end, options.seed)
    return Dataset.from_dict({"chosen_ids": c, "rejected_ids": r})


def reward_config(options: JudgeOptions, cfg: TrainConfig, output_dir: Path, progress: bool):
    from trl import RewardConfig

    p = hardware.precision(cfg)
    return RewardConfig(
        output_dir=str(output_dir), per_device_train_batch_size=options.batch_size,
        num_train_epochs=options.epochs, learning_rate=options.learning_rate, lr_scheduler_type="linear",
        warmup_steps=0.1, seed=options.seed, data_seed=options.seed, bf16=p.bf16, fp16=p.fp16,
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=10,
        max_length=None, center_rewards_coefficient=options.center_rewards or None, disable_tqdm=not progress,
        dataloader_num_workers=0, activation_checkpointing=False)  # TRL turns it on by default: short rows here


def train_judge(run: RunDir, cfg: TrainConfig, options: JudgeOptions, inputs: dict[str, Any],
                progress: bool = True) -> RewardJudge:
    """Train on the run's train pairs, save into a staging folder, load it back as any later evaluation will, measure
    it on the held-out pairs, then put the folder in place: a kill at any point leaves no judge, or the old one."""
    from trl import RewardTrainer

    splits = run.load_splits()
    rows = pair_rows(splits["train"], options.max_pairs, options.seed)
    if not rows:
        raise DataError(f"{run.splits_file}: the train split has no rows with a rejected answer: a reward judge "
                        f"learns from (chosen, rejected) pairs")
    staging = run.reward_judge_staging_dir
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed save
    staging.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_classifier(cfg, options, train=True)
        data = train_dataset(tokenizer, rows, cfg, options)
        # TRL pads with the tokenizer's pad token and tells the model's config: never the end-of-turn.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(rp.judge_pad_id(tokenizer))
        args = reward_config(options, cfg, staging / "trainer", progress)
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        quiet_trainer(trainer)
        result = trainer.train()
        trainer.model.save_pretrained(str(staging))
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's blank model card: judge.json describes the judge
        del trainer, model
        train_seconds = time.perf_counter() - t0
        judge = RewardJudge(*load_classifier(cfg, options, adapter=staging), options, cfg.system_prompt)
        t1 = time.perf_counter()
        heldout = heldout_accuracy(judge, pair_rows(splits["test"], options.max_test_pairs, options.seed))
        judge.record = {
            "format": FORMAT, "fingerprint": fingerprint(inputs), "inputs": inputs, "options": inputs["options"],
            "train_pairs": len(rows), "train_loss": float(result.training_loss), "steps": int(result.global_step),
            "train_seconds": round(train_seconds, 1), "heldout_seconds": round(time.perf_counter() - t1, 1),
            "heldout": heldout, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(staging / JUDGE_FILE, judge.record)
        replace_folder(staging, run.reward_judge_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("reward judge: %s", describe(judge.record))
    return judge


# --- held-out accuracy ------------------------------------------------------------------------------------------

def quiet_trainer(trainer) -> None:
    """One compact line per logging step, as training prints (train/progress.py); without progress, none: the
    Trainer's PrinterCallback would print every log dict."""
    from transformers import PrinterCallback

    from ..train.progress import use_compact_progress

    trainer.remove_callback(PrinterCallback)
    use_compact_progress(trainer)


def accuracy(margins: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How often the first answer of a pair scores higher (ties half), with a 95% percentile-bootstrap interval."""
    m = np.asarray(margins, dtype=float)
    outcome = (m > 0) + 0.5 * (m == 0)
    lo, hi = bootstrap_ci(outcome, n_boot=n_boot, seed=seed)
    return {"accuracy": float(outcome.mean()) if len(m) else float("nan"), "ci95": [lo, hi], "pairs": len(m)}


def heldout_accuracy(judge: RewardJudge, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """On held-out pairs: `raw` (each answer whole, as generated answers are scored), `matched` (both cut to the
    shorter one's length), `half` (both cut to half that: neither ends where its author ended it), and
    `longer_wins`, the accuracy of a judge that only counts tokens (the length-only control)."""
    if not rows:
        return {"pairs": 0}
    chosen, rejected = encode_pairs(judge.tokenizer, rows, judge.system_prompt, judge.end)
    cap = judge.options.max_answer_tokens
    out: dict[str, Any] = {"pairs": len(rows)}
    for cut in rp.CUTS:
        c, r = rp.pair_sequences(chosen, rejected, cut, cap, judge.end)
        rewards = judge.score(c + r)
        out["raw" if cut == "whole" else cut] = accuracy(np.subtract(rewards[:len(c)], rewards[len(c):]))
    lengths = [min(len(a.tokens), cap) - min(len(b.tokens), cap) for a, b in zip(chosen, rejected)]
    out["longer_wins"] = accuracy(lengths)
    out["chosen_longer"] = float(np.mean([d > 0 for d in lengths]))
    return out


def describe(record: dict[str, Any]) -> str:
    h = record.get("heldout", {})

    def one(key: str) -> str:
        m = h.get(key) or {}
        return f"{key} {m.get('accuracy', float('nan')):.3f} [{m.get('ci95', [0, 0])[0]:.3f}, " \
               f"{m.get('ci95', [0, 0])[1]:.3f}]"

    return (f"{record.get('train_pairs')} training pairs, {record.get('train_seconds')} s; held-out accuracy on "
            f"{h.get('pairs')} pairs: " + ", ".join(one(k) for k in ("raw", "matched", "half", "longer_wins")))


__all__ = ["JudgeOptions", "RewardJudge", "accuracy", "heldout_accuracy", "judge_inputs", "load_judge",
           "reward_judge", "rewards_of", "train_judge"]
