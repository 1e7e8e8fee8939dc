"""What every release stage shares: finding the run, its config and tokenizer files, the check result, and the
staging folder that becomes a release folder only once its check passes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError, ReleaseCheckFailed
from ..files import AGAIN, disk_full, is_disk_full, read_json, require_space, write_json
from ..model.loading import check_adapter_folder
from ..run import ADAPTER_CONFIG_FILE, RunDir, read_config_file
from ..run_lock import hold

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Pickles run code when loaded: a release never carries one (training_args.bin is the Trainer's).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Run-local paths: written into the adapter's training config by training, meaningless (and revealing) elsewhere.
LOCAL_PATH_OPTIONS = ("output_dir", "metrics_dir", "imgs_dir")


# (folder, warning) pairs this process has logged: CheckResult.report_warnings says each once.
_REPORTED: set[tuple[str, str]] = set()


@dataclass
class CheckResult:
    """A release folder's own check: errors block a push, warnings are printed."""

    folder: Path
    kind: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self) -> CheckResult:
        if self.errors:
            raise ReleaseCheckFailed(f"{self.kind} folder {self.folder} fails its check:\n  - "
                                     + "\n  - ".join(self.errors))
        self.report_warnings()
        return self

    def report_warnings(self) -> None:
        """Log each warning once per process, naming the folder a user will find: a stage checks its staging
        folder before it becomes the release folder, and a push checks that folder again."""
        folder = released_name(self.folder)
        for w in self.warnings:
            key = (str(folder.resolve()), w)
            if key not in _REPORTED:
                _REPORTED.add(key)
                log.warning("%s: %s", folder, w)


@dataclass
class RunFiles:
    """A finished training run as the release stages see it: its adapter, its settings and, when the adapter is
    still inside its run directory, the run (saved splits, trainer state, evaluation report)."""

    adapter_dir: Path
    run: RunDir | None
    cfg: TrainConfig
    # The base model's Hub id when training loaded it from a local copy (e.g. a Kaggle or Colab folder).
    base_model_id: str | None = None

    @property
    def base_id(self) -> str:
        """The name a release gives its base model: a Hub id, never a path of this machine."""
        if self.base_model_id:
            return self.base_model_id
        base = self.cfg.base_model
        return base if is_hub_id(base) or not any(c in base for c in "/\\") else Path(base).name

    def release_dir(self, stage: str) -> Path:
        return (self.run or RunDir.of(self.adapter_dir.parent)).release_dir(stage)

    def require_run(self, why: str) -> RunDir:
        if self.run is None:
            raise ConfigError(f"{self.adapter_dir} is not inside its run directory, which {why} needs (its "
                              f"saved splits): pass the run directory `fine-tune-llm train` wrote")
        return self.run


def locate_run(path: str | Path | RunDir, base_model_id: str | None = None) -> RunFiles:
    """Accept a run directory (with adapter/) or an adapter directory (with training_config.yaml)."""
    path = path.path if isinstance(path, RunDir) else Path(path).expanduser()
    run = RunDir.of(path)
    if (run.adapter_dir / "adapter_config.json").is_file():
        adapter_dir = run.adapter_dir
    elif (path / "adapter_config.json").is_file():
        adapter_dir = path
        parent = RunDir.of(path.parent)
        run = parent if parent.exists() and parent.adapter_dir == path else None
    else:
        raise ConfigError(f"{path} holds no adapter (adapter_config.json) and no adapter/ folder: pass the run "
                          f"directory `fine-tune-llm train` wrote, or its adapter/ folder")
    if (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        cfg = read_config_file(adapter_dir / ADAPTER_CONFIG_FILE, run.adapter_hint() if run else "")
    elif run is not None:
        cfg = run.read_config()
    else:
        raise ConfigError(f"{adapter_dir}: no {ADAPTER_CONFIG_FILE} and no run directory above it; the release "
                          f"needs the training settings (base model, data, hyperparameters)")
    return RunFiles(adapter_dir, run, cfg, base_model_id)


def checked_adapter(run: RunFiles) -> RunFiles:
    """The run's adapter files whole (not cut short, not garbled), or one message naming the file, before any work."""
    outside = "Copy the adapter folder again from where it came from."
    check_adapter_folder(run.adapter_dir, run.run.adapter_hint() if run.run else outside)
    return run


def release_lock(run: RunFiles, stage: str):
    """A release stage writes into its run directory (RUN/release/<stage>): it holds the run's lock for its
    lifetime (run_lock.py). An adapter folder outside any run directory has no run to lock."""
    return hold(run.run, f"release {stage}", create=False) if run.run else contextlib.nullcontext()


STAGING_MARK = ".partial-"  # staged() writes NAME's contents into .NAME.partial-XXXX beside it


def released_name(folder: Path) -> Path:
    """The release folder a staging folder becomes; any other folder is itself."""
    if folder.name.startswith(".") and STAGING_MARK in folder.name:
        return folder.with_name(folder.name[1:].rsplit(STAGING_MARK, 1)[0])
    return folder


@contextlib.contextmanager
def staged(final: str | Path, overwrite: bool, need: int = 0) -> Iterator[Path]:
    """A temporary folder beside `final` for a stage to write into; it replaces `final` only if the block ends
    without an error (the stage's check raises on failure), so a failed stage leaves no half-written release.
    `need` (bytes, when known) is checked against the free space first; a full disk midway is one message."""
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise ConfigError(f"{final} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    require_space(final.parent, need, f"writing {final}", AGAIN)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{STAGING_MARK}"))
    try:
        yield tmp
    except BaseException as exc:
        full = is_disk_full(exc, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(final.parent, need or None, f"writing {final}",
                            f"The partial folder was removed. {AGAIN}") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def public_config(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings without run-local paths."""
    return {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_PATH_OPTIONS}


def tokenizer_model_source(cfg: TrainConfig, explicit: str | Path | None = None) -> Path | None:
    """The base model's SentencePiece tokenizer.model (transformers 5's save_pretrained no longer writes it;
    llama.cpp's converter and slow tokenizers need it): an explicit file, the local model folder, or the
    Hugging Face cache / Hub."""
    if explicit:
        p = Path(explicit).expanduser()
        p = p / "tokenizer.model" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"tokenizer.model not found at {p}")
        return p
    from ..model.loading import model_source

    source, _ = model_source(cfg)
    local = Path(source).expanduser()
    if local.is_dir():
        return local / "tokenizer.model" if (local / "tokenizer.model").is_file() else None
    if not is_hub_id(source):
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(source, "tokenizer.model")
        if isinstance(cached, str):
            return Path(cached)
        return Path(hf_hub_download(source, "tokenizer.model"))
    except Exception as exc:  # noqa: BLE001 - offline, gated, or the model has no SentencePiece file
        log.warning("could not fetch tokenizer.model for %s (%s)", source, type(exc).__name__)
        return None


def save_tokenizer(tokenizer, out: Path, sp_model: Path | None) -> None:
    """Tokenizer files with the chat template, tokenizer.model beside them, and no local paths inside."""
    tokenizer.save_pretrained(str(out))
    if sp_model is not None:
        shutil.copyfile(sp_model, out / "tokenizer.model")
    cfg_file = out / "tokenizer_config.json"
    data = read_json(cfg_file)
    if data is not None:
        # transformers records where it read the vocabulary from (e.g. a temporary build folder) and
        # whether that was local: true only on this machine.
        cleaned = {k: v for k, v in data.items()
                   if k not in ("is_local", "local_files_only") and not _local_path(v)}
        # transformers 5 keeps added tokens in tokenizer.json only. llama.cpp's converter (SentencePiece path)
        # learns which pieces are control tokens from this key; without it `<start_of_turn>` is typed as
        # ordinary text and the GGUF tokenizes the chat template character by character.
        cleaned.setdefault("added_tokens_decoder", added_tokens_decoder(tokenizer))
        write_json(cfg_file, cleaned)


def added_tokens_decoder(tokenizer) -> dict[str, dict[str, Any]]:
    """The tokenizer's added tokens in tokenizer_config.json's (transformers 4) layout."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())}


def _local_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~")) or bool(re.match(r"^[A-Za-z]:\\", value)))


def pickle_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
