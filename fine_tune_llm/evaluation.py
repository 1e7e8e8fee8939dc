"""Before/after evaluation of a run: base model vs base + adapter, on the held-out test split.

One model is loaded; the base numbers come from the same weights with the adapter switched off
(PeftModel.disable_adapter), so base and tuned see the same quantization, data, tokens and settings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError, DataError
from .generation import generate_answers
from .modeling import check_environment, guard_cpu_4bit, load_model, load_tokenizer
from .run import RunDir
from .scoring import language_metrics, preference_metrics, score_answers

log = logging.getLogger(__name__)
# Compared base vs tuned in report["deltas"] (tuned minus base).
METRIC_KEYS = ["perplexity", "bits_per_byte", "loss", "accuracy_normalized", "accuracy_sum", "mean_margin",
               "mean_margin_sum"]


# float32 compute: bf16 logits can differ in the third digit with the shape of the batch (on GPUs), and
# evaluation numbers must not depend on the batch size.
EVAL_DTYPE = "float32"


def load_for_eval(cfg: TrainConfig, adapter_dir: str | Path | None = None, dtype: str = EVAL_DTYPE):
    """The base model as the config loads it (quantized as configured), plus the adapter when given.

    Compute runs in float32 by default (EVAL_DTYPE); the stored weights stay as configured (4-bit).
    """
    eval_cfg = dataclasses.replace(cfg, dtype=dtype) if dtype else cfg
    tokenizer = load_tokenizer(cfg)
    model = load_model(eval_cfg)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"no adapter in {adapter_dir} (adapter_config.json missing): did training finish?")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    guard_cpu_4bit(model)
    model.eval()
    return model, tokenizer


def eval_rows(run: RunDir, split: str = "test") -> list[dict[str, Any]]:
    """The run's saved split (splits.json), read back and checked against the data file."""
    splits = run.load_splits()
    if split not in splits:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(splits)}")
    if split == "train":
        log.warning("evaluating on the train split: these numbers say how well the model fits, not generalizes")
    rows = splits[split]
    if not rows:
        option = {"test": "test_fraction", "validation": "val_fraction"}.get(split, "data_samples")
        raise DataError(f"the {split} split of {run} is empty: raise {option} when training, or evaluate "
                        f"another split")
    return rows


def score_model(model, tokenizer, cfg: TrainConfig, rows: list[dict[str, Any]], batch_size: int = 8,
                label: str = "", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Perplexity and bits per byte on the chosen answers; preference over (chosen, rejected) pairs."""
    kwargs = {"max_length": cfg.max_length, "system_prompt": cfg.system_prompt, "batch_size": batch_size,
              "progress": progress}
    questions = [r["question"] for r in rows]
    chosen = score_answers(model, tokenizer, questions, [r["answer"] for r in rows],
                           desc=f"{label} chosen".strip(), **kwargs)
    metrics = language_metrics(chosen)
    pair_rows = [i for i in chosen.kept if rows[i].get("rejected")]
    if pair_rows:
        rejected = score_answers(model, tokenizer, [questions[i] for i in pair_rows],
                                 [rows[i]["rejected"] for i in pair_rows], desc=f"{label} rejected".strip(), **kwargs)
        at = {i: n for n, i in enumerate(chosen.kept)}
        pairs = [(at[pair_rows[n]], n) for n in rejected.kept]
        metrics.update(preference_metrics(
            ([chosen.nats[j] for j, _ in pairs], [chosen.tokens[j] for j, _ in pairs]),
            ([rejected.nats[k] for _, k in pairs], [rejected.tokens[k] for _, k in pairs]), seed=seed))
    else:
        metrics["pairs"] = 0
    return metrics


def compare_generations(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int,
                        system_prompt: str | None, seed: int, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Greedy and sampled answers from base (adapter off) and tuned, with the same settings and seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for mode, sample in (("greedy", False), ("sampled", True)):
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sample, "seed": seed, "batch_size": batch_size,
                      "system_prompt": system_prompt, "progress": progress}
        with model.disable_adapter():
            base = generate_answers(model, tokenizer, questions, **kwargs)
        tuned = generate_answers(model, tokenizer, questions, **kwargs)
        out[mode] = [{"question": q, "base": _strip(b), "tuned": _strip(t)} for q, b, t in zip(questions, base, tuned)]
    return out


def _strip(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "question"}


def deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    return {k: tuned[k] - base[k] for k in METRIC_KEYS if k in base and k in tuned}


def evaluate_run(run_dir: RunDir | str | Path, split: str = "test", batch_size: int = 8, n_generations: int = 5,
                 max_new_tokens: int = 128, metrics_dir: str | Path | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate base vs tuned on the run's held-out split; write report.json, report.md and a runs.csv row."""
    from .report import append_runs_csv, build_report, write_report

    t0 = time.time()
    run = RunDir.of(run_dir)
    cfg = run.read_config()
    check_environment(cfg)
    rows = eval_rows(run, split)
    model, tokenizer = load_for_eval(cfg, run.adapter_dir, dtype=EVAL_DTYPE)
    with model.disable_adapter():
        base = score_model(model, tokenizer, cfg, rows, batch_size, label="base", seed=seed, progress=progress)
    tuned = score_model(model, tokenizer, cfg, rows, batch_size, label="tuned", seed=seed, progress=progress)
    questions = list(dict.fromkeys(r["question"] for r in rows))[:n_generations]
    generations = compare_generations(model, tokenizer, questions, max_new_tokens, batch_size, cfg.system_prompt,
                                      seed, progress) if questions else {}
    settings = {"split": split, "batch_size": batch_size, "n_generations": len(questions),
                "max_new_tokens": max_new_tokens, "seed": seed, "compute_dtype": EVAL_DTYPE,
                "sampling": _sampling_settings(model)}
    report = build_report(run, cfg, settings, base, tuned, deltas(base, tuned), generations, time.time() - t0)
    write_report(run, report)
    append_runs_csv(Path(metrics_dir or cfg.metrics_dir) / "runs.csv", report)
    return report


# What transformers samples with when the model's generation config leaves a knob unset.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def _sampling_settings(model) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    return {k: v if getattr(gen, k, None) is None else getattr(gen, k) for k, v in SAMPLING_DEFAULTS.items()}
