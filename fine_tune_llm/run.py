"""The run directory: the one owner of its layout, its config and its saved splits.

    RUN/config.yaml          the resolved TrainConfig        RUN/manifest.json   how the run was made
    RUN/splits.json          which rows each split holds     RUN/logs/           TensorBoard event files
    RUN/checkpoint-N/        resumable checkpoints           RUN/adapter/        the trained LoRA adapter
    RUN/trainer_state.json   the Trainer's log history       RUN/report.{json,md} evaluation
    RUN/release/<stage>/     release folders (adapter, merged, gguf)
    RUN/sft_run.json         (a preference stage) the SFT run it continued and that run's adapter hash
    RUN/trace/               per-rank row traces (debugging data sharding; off by default)
    RUN/harness/             lm-evaluation-harness task files built from the run's split (evaluate --tasks)
    RUN/metrics/, RUN/imgs/  the run's own exported curves and plot (the demo's: the checkout stays clean)
    RUN/.lock                who writes the run now (run_lock.py: one writer per run directory)
    RUN/.adapter.partial/    the adapter being saved; it replaces adapter/ only once whole
    RUN/reward_judge/        a reward model trained on the run's train pairs (eval/reward_judge.py), with its
                             fingerprint and held-out accuracy; RUN/.reward_judge.partial/ while it is made

Every stage takes a RunDir (or a path it turns into one); no other module spells these names.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig, field_names, read_yaml_mapping
from .data import splits as saved_splits
from .errors import ConfigError, DamagedFile
from .files import read_json, write_atomic

CONFIG_FILE = "config.yaml"
# The adapter folder carries its own copy, so an adapter copied elsewhere still names its training settings.
ADAPTER_CONFIG_FILE = "training_config.yaml"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def read_config_file(path: str | Path, hint: str = "") -> TrainConfig:
    """A TrainConfig from a YAML file a run wrote; options this version no longer has are ignored."""
    values = read_config_values(path, hint)
    return TrainConfig(**{k: v for k, v in values.items() if k in field_names()})


def read_config_values(path: str | Path, hint: str = "") -> dict[str, Any]:
    """The raw values of a config file a run wrote; a garbled one is named, with what to do (`hint`)."""
    try:
        return read_yaml_mapping(path)
    except ConfigError as exc:
        if not Path(path).is_file():
            raise
        raise DamagedFile(f"{exc}: the file is garbled or cut short. {hint}".rstrip()) from None


def write_config_file(path: str | Path, cfg: TrainConfig, drop: tuple[str, ...] = ()) -> Path:
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}
    return write_atomic(path, yaml.safe_dump(values, sort_keys=False))


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(Path(run).expanduser())

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # --- layout ---------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    @property
    def splits_file(self) -> Path:
        return self.path / "splits.json"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def adapter_staging_dir(self) -> Path:
        return self.path / ".adapter.partial"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def trainer_state_file(self) -> Path:
        return self.path / "trainer_state.json"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def parent_file(self) -> Path:
        """A preference stage's record of the SFT run it continued, and that run's adapter hash."""
        return self.path / "sft_run.json"

    @property
    def reference_logps_file(self) -> Path:
        """A preference stage's reference log-probs, computed once and read back by a resumed stage."""
        return self.path / "reference_logps.json"

    @property
    def trace_dir(self) -> Path:
        """Debug traces of which rows each process trained on (train/rowtrace.py; off unless asked for)."""
        return self.path / "trace"

    @property
    def harness_dir(self) -> Path:
        """Task files for lm-evaluation-harness built from the run's own split (eval/harness.py)."""
        return self.path / "harness"

    @property
    def reward_judge_dir(self) -> Path:
        """The reward-model judge of generated answers, trained on the run's own train pairs (eval/reward_judge.py)."""
        return self.path / "reward_judge"

    @property
    def reward_judge_staging_dir(self) -> Path:
        return self.path / ".reward_judge.partial"

    @property
    def metrics_dir(self) -> Path:
        """Curves exported for this run alone (the shared place is the repository's metrics/)."""
        return self.path / "metrics"

    @property
    def imgs_dir(self) -> Path:
        return self.path / "imgs"

    def release_dir(self, stage: str) -> Path:
        return self.path / "release" / stage

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def checkpoints(self) -> list[Path]:
        """checkpoint-N folders, newest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("checkpoint-*")
                 if p.is_dir() and (m := CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    # --- state ----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove everything in the run directory but its lock file (whose holder is the caller: run_lock.py)."""
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry != self.lock_file:
                entry.unlink()

    def exists(self) -> bool:
        return self.config_file.is_file()

    def read_config(self) -> TrainConfig:
        """The resolved config the run was trained with: the one way every stage reads it."""
        if not self.exists():
            raise ConfigError(f"no {CONFIG_FILE} in {self.path}: is it a run directory made by "
                              f"`fine-tune-llm train`?")
        return read_config_file(self.config_file, self._config_hint())

    def read_config_values(self) -> dict[str, Any]:
        """The raw values of config.yaml (checkpoint resumption compares them with the new config)."""
        return read_config_values(self.config_file, self._config_hint()) if self.exists() else {}

    def _config_hint(self) -> str:
        copy = self.adapter_dir / ADAPTER_CONFIG_FILE
        if copy.is_file():
            return f"The adapter keeps a copy of it: `cp {copy} {self.config_file}`."
        return "Training writes it: train this run again with --no-resume, or choose another --output-dir."

    def write_config(self, cfg: TrainConfig) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return write_config_file(self.config_file, cfg)

    def save_splits(self, splits: saved_splits.Splits, source: str) -> Path:
        return saved_splits.save(self.splits_file, splits, source)

    def load_splits(self) -> saved_splits.Splits:
        """The rows training used, read back and checked against their hashes (see data/splits.py)."""
        if not self.splits_file.is_file():
            raise ConfigError(f"no {self.splits_file.name} in {self.path}: the run predates saved splits or did "
                              f"not finish preparing its data; train it again to evaluate or release it")
        return saved_splits.load(self.splits_file, hint=self.rebuild_hint())

    def adapter_hint(self) -> str:
        """What to do when the adapter is damaged: the training that wrote it saves it again."""
        return (f"Training writes it: run `fine-tune-llm train --config {self.config_file}` again; it resumes from "
                f"the run's last complete checkpoint and saves the adapter anew.")

    def rebuild_hint(self) -> str:
        """What to do when a file training wrote is damaged: train the run again (the split and checkpoints with
        it), which rewrites every file of the run."""
        return (f"Training writes it: train the run again from the start (`fine-tune-llm train --config "
                f"{self.config_file} --no-resume`), or train into another --output-dir.")

    def data_record(self) -> dict[str, Any]:
        """The data's format (as read, with any --columns mapping) and counts, as training recorded them."""
        return saved_splits.data_record(self.splits_file)

    def split_counts(self) -> dict[str, int] | None:
        return saved_splits.counts(self.splits_file)

    def trainer_state(self) -> dict[str, Any] | None:
        return read_json(self.trainer_state_file)

    def report(self) -> dict[str, Any] | None:
        return read_json(self.report_json)
