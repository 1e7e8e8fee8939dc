"""Before/after evaluation of a run on its saved held-out test split: the base model and each tuned stage
(SFT; SFT+DPO for a preference run), compared as users run them.

One model is loaded: the base weights as released (unquantized, float32 compute) with each stage's adapter on
top, switched per column; the base column has every adapter off. So every column sees the same weights, data,
tokens and settings, and the tuned columns are what the merged release computes. `quantized=True` scores the
4-bit base training saw instead, labelled as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.formats import DataFormat, assistant_turns, conversation, with_answer
from ..data.rows import without_rejected
from ..data.tokenized import encode_examples
from ..errors import ConfigError, DataError
from ..model.generation import BASE, GENERATION_ROWS, generate_columns
from ..model.hardware import check_environment
from ..model.loading import check_adapter_folder, guard_cpu_4bit, load_model, load_tokenizer
from ..run import RunDir
from ..run_lock import hold
from ..train.lineage import parent_of
from . import harness as lm_harness
from . import harness_report
from .behaviour import judge_behaviour
from .scoring import Scored, language_metrics, preference_metrics, score_parts
from .shared_trunk import SharedTrunk

log = logging.getLogger(__name__)
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

        adapter_dir = check_adapter_folder(adapter_dir, _adapter_hint(Path(adapter_dir)))
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    guard_cpu_4bit(model)
    model.eval()
    return model, tokenizer


def _adapter_hint(adapter_dir: Path) -> str:
    run = RunDir.of(adapter_dir.parent)
    return run.adapter_hint() if run.exists() and run.adapter_dir == adapter_dir else ""


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
                label: str = "", seed: int = 0, progress: bool = True,
                parts: dict[str, dict[str, list[Any]]] | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte over every trained assistant token (cfg.train_on), and preference over the rows
    with a rejected answer: the final answer against its rejected alternative, given the same earlier turns.

    Every sequence this needs is scored in one pass (scoring.score_parts). `parts`: scoring_parts(...) of the same
    rows, encoded once for several models."""
    parts = parts if parts is not None else scoring_parts(tokenizer, cfg, rows)
    scored = score_parts(model, tokenizer, parts, batch_size, desc=label or "scoring", progress=progress)
    return column_metrics(scored, rows, seed)


def score_columns(columns: Columns, tokenizer, cfg: TrainConfig, rows: list[dict[str, Any]], batch_size: int = 8,
                  seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """score_model's metrics for every column, on the same parts, the blocks below the lowest adapted one run for
    the first column only (SharedTrunk: the later columns start from its hidden states there)."""
    parts, trunk, metrics = scoring_parts(tokenizer, cfg, rows), SharedTrunk(columns.model), {}
    for n, name in enumerate(columns.names):
        with columns.use(name) as model, (trunk.replay() if n else trunk.record()):
            metrics[name] = score_model(model, tokenizer, cfg, rows, batch_size, label=columns.labels[name],
                                        seed=seed, progress=progress, parts=parts)
    return metrics


def scoring_parts(tokenizer, cfg: TrainConfig, rows: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """The sequences a column is scored on, tokenized as training does: every row's conversation ("chosen", its
    trained turns); for the rows with a rejected answer, that answer after the same earlier turns ("rejected"); and
    the chosen final answer alone ("final") where "chosen" trains earlier turns too (train_on all, multi-turn)."""
    encode = partial(encode_examples, tokenizer, max_length=cfg.max_length, system_prompt=cfg.system_prompt)
    parts = {"chosen": encode(rows, train_on=cfg.train_on)}
    pairs = [r for r in rows if r.get("rejected")]
    if pairs and not _final_is_chosen(cfg, pairs):
        parts["final"] = encode(pairs, train_on="last")
    if pairs:
        parts["rejected"] = encode([{**r, "messages": with_answer(r, r["rejected"])} for r in pairs], train_on="last")
    return parts


def _final_is_chosen(cfg: TrainConfig, pairs: list[dict[str, Any]]) -> bool:
    """Whether the chosen conversation's trained tokens are its final answer's already."""
    return cfg.train_on == "last" or all(assistant_turns(r) == 1 for r in pairs)


def column_metrics(scored: dict[str, Scored], rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """score_model's numbers from the scored parts: language metrics of "chosen", preference of final vs rejected
    over the pairs neither of which was cut short (a cut conversation has lost its final answer)."""
    chosen = scored["chosen"]
    metrics = language_metrics(chosen)
    if "rejected" not in scored:
        metrics["pairs"] = 0
        return metrics
    pair_rows = [i for i, r in enumerate(rows) if r.get("rejected")]
    final, rejected = scored.get("final") or chosen.subset(pair_rows), scored["rejected"]
    f_at = {i: n for n, i in enumerate(final.kept) if final.status[n] != "cut"}
    r_at = {i: n for n, i in enumerate(rejected.kept) if rejected.status[n] != "cut"}
    both = [(f_at[i], r_at[i]) for i in range(len(pair_rows)) if i in f_at and i in r_at]
    metrics.update(preference_metrics(([final.nats[j] for j, _ in both], [final.tokens[j] for j, _ in both]),
                                      ([rejected.nats[k] for _, k in both], [rejected.tokens[k] for _, k in both]),
                                      seed=seed))
    return metrics


@dataclass
class Columns:
    """One model in memory, several columns of the report: the base (adapters off) and each tuned stage (its
    adapter on). Every column sees the same base weights, data, tokens and settings."""

    model: Any
    names: list[str]  # "base", then "sft" for a preference run, then "tuned" (the run's own adapter)
    labels: dict[str, str]
    weights: str  # which base weights and compute, said in the report

    @contextlib.contextmanager
    def use(self, name: str):
        if name == "base":
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(name)
            yield self.model


def load_columns(run: RunDir, cfg: TrainConfig, quantized: bool = False) -> Columns:
    """Base as released (unquantized weights, float32 compute) and each stage's adapter on it: what a user runs
    (the merged model is exactly this). quantized=True scores the 4-bit base training saw instead, labelled so."""
    import torch
    from peft import PeftModel

    sft = parent_of(run) if cfg.stage == "dpo" else None
    adapters = ([("sft", sft.adapter_dir)] if sft else []) + [("tuned", run.adapter_dir)]
    for _, folder in adapters:
        check_adapter_folder(folder, _adapter_hint(folder))
    base = load_model(dataclasses.replace(cfg, dtype=EVAL_DTYPE), quantize=quantized, dtype=torch.float32)
    use_eval_attention(base)
    model = PeftModel.from_pretrained(base, str(adapters[0][1]), adapter_name=adapters[0][0], is_trainable=False)
    for name, folder in adapters[1:]:
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    guard_cpu_4bit(model)
    model.eval()
    tuned = {"sft": "SFT+DPO" if sft else "SFT", "dpo": "SFT+DPO"}.get(cfg.stage, "tuned")
    labels = {"base": "base", **({"sft": "SFT"} if sft else {}), "tuned": tuned}
    weights = ("4-bit NF4 base as trained (quantized view), float32 compute" if quantized and cfg.quantization != "none"
               else "base weights as released (unquantized), float32 compute")
    return Columns(model, ["base", *[n for n, _ in adapters]], labels, weights)


def use_eval_attention(model) -> None:
    """SDPA for evaluation where the run trained with eager attention: eager is the CPU preset's choice for
    training steps on short rows, while SDPA generated 1.3x faster on the same CPU with the same numbers (float32:
    1e-8 apart, the same greedy answers; docs/results.md#evaluation-speed). Not for models whose attention caps its
    logits (Gemma 2's attn_logit_softcapping), which only eager computes."""
    config = model.config
    if config._attn_implementation == "eager" and getattr(config, "attn_logit_softcapping", None) is None:
        model.set_attn_implementation("sdpa")


def compare_generations(columns: Columns, tokenizer, questions: list[str | list[dict[str, str]]], max_new_tokens: int,
                        rows: int, system_prompt: str | None, seed: int,
                        progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Greedy and sampled answers from every column, with the same settings and seed, generated together: one
    batch holds several columns' answers (model.generation.generate_columns, `rows` answers a batch). A question
    is a user's text or a conversation ending with a user turn (generate_answers)."""
    adapters = {name: BASE if name == "base" else name for name in columns.names}
    answers = generate_columns(columns.model, tokenizer, questions, list(adapters.values()), max_new_tokens, seed,
                               rows, system_prompt, progress=progress)
    out: dict[str, list[dict[str, Any]]] = {}
    for mode, by_adapter in answers.items():
        first = by_adapter[adapters[columns.names[0]]]
        out[mode] = [{"question": first[i]["question"], **({"context": first[i]["context"]} if "context" in first[i]
                                                          else {}),
                      **{name: _strip(by_adapter[adapters[name]][i]) for name in columns.names}}
                     for i in range(len(questions))]
    return out


def generation_prompts(rows: list[dict[str, Any]], n: int, seed: int = 0) -> list[str | list[dict[str, str]]]:
    """n prompts (each row's turns before its final answer) from n distinct near-duplicate clusters, drawn with the
    seed across the whole split, multi-turn ones first: they show whether the model answers the last turn in the
    light of the earlier ones. One user turn stays text."""
    from ..data.clusters import spread_picks  # here, not above: this function is this module's one use of it

    prompts: list[str | list[dict[str, str]]] = []
    for row in spread_picks(rows, n, seed):
        turns = conversation(row)[:-1]
        prompts.append(turns[0]["content"] if len(turns) == 1 else turns)
    return prompts


def no_pairs_note(run: RunDir, rows: list[dict[str, Any]], metrics: dict[str, Any]) -> str | None:
    """Why the report has no preference metrics, when it has none."""
    if metrics.get("pairs"):
        return None
    if any(r.get("rejected") for r in rows):
        return "every pair of this split is cut at max_length, so no final answer can be compared"
    fmt = DataFormat.from_record(run.data_record())
    return "the rows have no rejected answer" + (f": {without_rejected(fmt)}" if fmt else "")


def length_summary(generations: dict[str, list[dict[str, Any]]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per column, from the greedy answers: mean generated tokens and how many ended their turn by themselves.
    A preference stage can learn "longer" instead of "kinder" (the chosen answer is the longer one in ~99% of
    the psychology pairs): this is where a reader sees it."""
    rows = generations.get("greedy", [])
    out = {}
    for name in names:
        answers = [g[name] for g in rows]
        out[name] = {"answers": len(answers),
                     "mean_new_tokens": sum(a["new_tokens"] for a in answers) / len(answers) if answers else None,
                     "ended_turn": sum(not a["hit_max_tokens"] for a in answers)}
    return out


def _strip(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "question"}


def evaluate_run(run_dir: RunDir | str | Path, split: str = "test", batch_size: int = 8,
                 n_generations: int | None = None,
                 max_new_tokens: int = 128, metrics_dir: str | Path | None = None, seed: int = 0,
                 progress: bool = True, quantized: bool = False, tasks: str | Sequence[str] | None = None,
                 limit: int | None = None, generation_rows: int = GENERATION_ROWS, judge: Any = None,
                 judges: bool = True) -> dict[str, Any]:
    """Base vs each tuned stage on the run's held-out split; write report.json, report.md and a runs.csv row.

    Each column is one scoring pass (batch_size sequences a batch); the generations of every column are made
    together, generation_rows answers a batch. tasks: lm-evaluation-harness tasks run on the same columns too
    (eval/harness.py), `limit` items of each. judges: the reward-model judge and the safety probe (no extra
    model); judge: a stronger model (Hub id, folder, .gguf or OpenAI-compatible URL) comparing answers pairwise
    (eval/behaviour.py)."""
    from .report import append_runs_csv, build_report, write_report
    from .report_plot import plot_report

    t0 = time.time()
    if tasks:
        lm_harness.require_lm_eval()  # at once, before the run is even read
    run = RunDir.of(run_dir)
    cfg = run.read_config()
    with hold(run, "evaluation", create=False):  # it writes the run's report: one writer per run directory
        check_environment(cfg, purpose="evaluate")
        rows = eval_rows(run, split)
        if isinstance(judge, str):  # a bad --judge stops here, before any model is loaded
            from .judge_backends import load_judge

            judge = load_judge(judge)
        tokenizer = load_tokenizer(cfg)
        harness = lm_harness.plan(run, cfg, tokenizer, rows, tasks, split) if tasks else None
        columns = load_columns(run, cfg, quantized)
        metrics = score_columns(columns, tokenizer, cfg, rows, batch_size, seed, progress)
        n_generations = cfg.eval_generations if n_generations is None else n_generations
        questions = generation_prompts(rows, n_generations, seed)
        generations = compare_generations(columns, tokenizer, questions, max_new_tokens, generation_rows,
                                          cfg.system_prompt, seed, progress) if questions else {}
        behaviour = judge_behaviour(run, cfg, columns, tokenizer, rows, generations, judge, reward=judges,
                                    safety=judges, max_new_tokens=max_new_tokens, rows=generation_rows, seed=seed,
                                    progress=progress)
        settings = {"split": split, "batch_size": batch_size, "generation_rows": generation_rows,
                    "n_generations": len(questions),
                    "max_new_tokens": max_new_tokens, "seed": seed, "compute_dtype": EVAL_DTYPE,
                    "weights": columns.weights, "quantized": quantized, "sampling": _sampling_settings(columns.model),
                    "train_on": cfg.train_on, "data": run.data_record(),
                    "no_pairs": no_pairs_note(run, rows, metrics["base"])}
        # Last: lm-eval reseeds the global random generators.
        raw = lm_harness.run_harness(harness, columns, cfg, limit, batch_size) if harness else None
        report = build_report(run, cfg, settings, metrics, columns.labels, generations,
                              length_summary(generations, columns.names), time.time() - t0)
        report["behaviour"] = behaviour
        if harness:
            report["harness"] = lm_harness.summary(raw, harness, limit)
        write_report(run, report)
        append_runs_csv(Path(metrics_dir or cfg.metrics_dir) / "runs.csv", report)
        if harness:
            harness_report.append_csv(Path(metrics_dir or cfg.metrics_dir) / "harness.csv", report)
        report["plot"] = str(plot_report(report, cfg.imgs_dir))
    return report


# What transformers samples with when the model's generation config leaves a knob unset.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def _sampling_settings(model) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    return {k: v if getattr(gen, k, None) is None else getattr(gen, k) for k, v in SAMPLING_DEFAULTS.items()}
