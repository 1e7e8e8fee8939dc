"""Standard benchmarks before and after tuning: EleutherAI's lm-evaluation-harness run on the report's own columns.

The harness scores the model `load_columns` already holds (its HFLM wrapper accepts a loaded model), with the
adapters switched exactly as for the report's other numbers: every column sees the same base weights, dtype and
tokenizer. lm-eval lives in the optional `eval` dependency group; it is imported here only, when --tasks is given.

`heldout_pairs` names a task built from the run's own split: each (question, chosen, rejected) pair is a
two-choice item whose context is the rendered chat prompt and whose choices are the two answers as our scorer
sees them (sanitized, with the end-of-turn string the answer mask covers). lm-eval's `acc` on it (the answer with
the higher summed log-likelihood wins) is then our raw-sum preference accuracy, computed by code we did not write.
lm-eval moves the prompt's trailing newline into each choice and scores it too: the same token after the same
context, so it adds the same log-probability to both answers and cancels in the pair.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import TrainConfig
from ..data.chat_template import (
    build_messages,
    completion_texts,
    control_strings,
    encode_batch,
    render_prompt,
)
from ..errors import ConfigError, EnvironmentNotReady
from ..files import write_atomic
from ..run import RunDir
from .harness_report import PAIRS_TASK, summarize

log = logging.getLogger(__name__)

INSTALL_COMMAND = "make install-eval"
YAML_SUFFIXES = (".yaml", ".yml")


def require_lm_eval():
    """lm_eval, or one message naming the install command (before anything heavy runs)."""
    try:
        import lm_eval
    except ImportError:
        raise EnvironmentNotReady(
            f"--tasks runs EleutherAI's lm-evaluation-harness, which is in the optional `eval` dependency group and "
            f"not installed here: run `{INSTALL_COMMAND}` (or `make install GROUPS=eval`), then evaluate again"
        ) from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """--tasks: comma-separated lm-eval task, group or tag names and task YAML files, or a YAML file listing
    them (a list, or a mapping with a `tasks` list; relative paths in it are relative to the file)."""
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    items = [t for t in items if t]
    if not items:
        raise ConfigError("--tasks is empty: name lm-eval tasks (e.g. arc_easy,mmlu_high_school_psychology), "
                          f"`{PAIRS_TASK}` or a task YAML file")
    specs: list[str] = []
    for item in items:
        specs += _expand(item, Path.cwd())
    return list(dict.fromkeys(specs))


def _expand(item: str, folder: Path) -> list[str]:
    if not item.endswith(YAML_SUFFIXES):
        return [item]
    path = (folder / Path(item).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"--tasks: no such file {path}")
    listed = _task_list(path)
    if listed is None:
        return [str(path)]  # a task or group config: lm-eval reads it itself
    return [spec for entry in listed for spec in _expand(str(entry), path.parent)]


def _task_list(path: Path) -> list[str] | None:
    """The names a task-list YAML holds; None for an lm-eval task or group config."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError:
        return None  # lm-eval's own tags (!function ...): a task config
    except yaml.YAMLError as exc:
        raise ConfigError(f"--tasks: {path} is not valid YAML ({exc})") from None
    if isinstance(data, dict) and not ({"task", "group", "include"} & set(data)):
        data = data.get("tasks")
    if isinstance(data, dict):
        return None
    if isinstance(data, list) and data and all(isinstance(t, str) and t.strip() for t in data):
        return [t.strip() for t in data]
    raise ConfigError(f"--tasks: {path} is neither an lm-eval task config (with `task:` or `group:`) nor a list "
                      f"of task names (a YAML list, or `tasks:` holding one)")


# --- a task from the run's own pairs -------------------------------------------------------------------------------

def pair_items(tokenizer, cfg: TrainConfig, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(items, left out): one two-choice item per row with a rejected answer, chosen first (gold 0). Pairs where
    either answer does not fit max_length whole are left out: lm-eval would score a different cut of them."""
    pairs = [r for r in rows if r.get("rejected")]
    prompts = [build_messages(r["question"], cfg.system_prompt) for r in pairs]
    chosen = encode_batch(tokenizer, prompts, [r["answer"] for r in pairs], cfg.max_length)["status"]
    rejected = encode_batch(tokenizer, prompts, [r["rejected"] for r in pairs], cfg.max_length)["status"]
    controls = control_strings(tokenizer)
    items = []
    for row, prompt, a, b in zip(pairs, prompts, chosen, rejected):
        if a == b == "ok":
            items.append({"row": row.get("row"), "context": render_prompt(tokenizer, prompt),
                          "choices": completion_texts(tokenizer, [row["answer"], row["rejected"]], controls),
                          "gold": 0})
    return items, len(pairs) - len(items)


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    """An lm-eval multiple-choice task over a local JSON-lines file: no network, no Python code."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        # The choices already start where the prompt ends: lm-eval's default " " would add a token we never score.
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_task(folder: Path, name: str, items: list[dict[str, Any]]) -> Path:
    """folder/<name>.jsonl and folder/<name>.yaml (the file --tasks takes)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    write_atomic(data, "".join(json.dumps(item) + "\n" for item in items))
    return write_atomic(folder / f"{name}.yaml", yaml.safe_dump(task_config(name, data.resolve()), sort_keys=False))


def write_pairs_task(run: RunDir, tokenizer, cfg: TrainConfig, rows: list[dict[str, Any]],
                     split: str) -> dict[str, Any]:
    items, left_out = pair_items(tokenizer, cfg, rows)
    if not items:
        raise ConfigError(f"--tasks {PAIRS_TASK}: the {split} split of {run} has no (question, chosen, rejected) "
                          f"pair that fits max_length={cfg.max_length}")
    path = write_task(run.harness_dir, PAIRS_TASK, items)
    return {"file": str(path), "split": split, "pairs": len(items), "left_out": left_out}


# --- running it ----------------------------------------------------------------------------------------------------

@dataclass
class HarnessPlan:
    """What --tasks resolved to, checked before any model loads."""

    specs: list[str]  # names and YAML paths, as lm-eval's TaskManager takes them
    manager: Any  # lm_eval.tasks.TaskManager
    pairs: dict[str, Any] | None  # the heldout_pairs task file, when asked for


def plan(run: RunDir, cfg: TrainConfig, tokenizer, rows: list[dict[str, Any]], tasks: str | Sequence[str],
         split: str = "test") -> HarnessPlan:
    """lm-eval present, every task known and its data loadable: each failure names its task, before the model."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    specs = parse_tasks(tasks)
    pairs = None
    if PAIRS_TASK in specs:
        pairs = write_pairs_task(run, tokenizer, cfg, rows, split)
        specs = [pairs["file"] if s == PAIRS_TASK else s for s in specs]
    # The built-in index takes seconds to build; files alone need none of it.
    manager = TaskManager(include_defaults=not all(s.endswith(YAML_SUFFIXES) for s in specs))
    for spec in specs:
        _check_loads(manager, spec)
    return HarnessPlan(specs, manager, pairs)


def _check_loads(manager, spec: str) -> None:
    try:
        manager.load([spec])
    except KeyError:
        raise ConfigError(f"--tasks: {spec!r} is not an lm-eval task, group or tag (`python -m lm_eval ls tasks` "
                          f"lists them) nor a task YAML file") from None
    except Exception as exc:  # noqa: BLE001 - a dataset lm-eval cannot fetch or parse: name the task, not a trace
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise EnvironmentNotReady(
            f"--tasks: lm-eval could not load the data of {spec!r} ({type(exc).__name__}: {first}). Standard tasks "
            f"fetch their data from the Hugging Face Hub once; offline, point a task YAML at local files "
            f"(docs/evaluation.md#standard-benchmarks)") from None


def run_harness(harness: HarnessPlan, columns, cfg: TrainConfig, limit: int | None = None,
                batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """{column: {"results": lm-eval's results with per-item samples, "seconds", "cpu_seconds"}}, every column through
    the one loaded model, its adapters switched as for the report's other columns."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ..model.loading import load_tokenizer

    # A tokenizer of its own: HFLM may set a pad token on the one it gets.
    lm = HFLM(pretrained=columns.model, tokenizer=load_tokenizer(cfg), batch_size=batch_size)
    out: dict[str, dict[str, Any]] = {}
    for name in columns.names:
        log.info("lm-evaluation-harness: %s on %s", ", ".join(Path(s).stem if s.endswith(YAML_SUFFIXES) else s
                                                              for s in harness.specs), columns.labels[name])
        t0, cpu0 = time.time(), time.process_time()
        with columns.use(name):
            results = simple_evaluate(lm, tasks=list(harness.specs), task_manager=harness.manager, limit=limit,
                                      log_samples=True)
        out[name] = {"results": results, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0}
    return out


def summary(raw: dict[str, dict[str, Any]], harness: HarnessPlan, limit: int | None = None) -> dict[str, Any]:
    """report["harness"]: the before/after table (eval/harness_report.py), without the per-item samples."""
    from importlib.metadata import version

    return {"tasks": harness.specs, **summarize(raw, limit, harness.pairs, version("lm_eval"))}
