"""Stage 4: upload a checked release folder to a Hugging Face Hub model repo.

The token is huggingface_hub's business: it reads HF_TOKEN or the login cache (`hf auth login`) itself. This
module never reads, passes, prints, logs or writes it; it only asks whether one is configured.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EnvironmentNotReady
from ..files import human_bytes
from ..run import RunDir
from ..run_lock import hold
from .common import CheckResult
from .folders import check_folder

log = logging.getLogger(__name__)
# Nothing of ours is excluded; huggingface_hub adds its own defaults (.git/, .cache/huggingface/).
IGNORE_PATTERNS: list[str] = []


@dataclass
class PushResult:
    repo_id: str
    folder: Path
    files: list[tuple[str, int]]
    dry_run: bool
    private: bool
    check: CheckResult
    commit_url: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def listing(self) -> str:
        width = max((len(f"{s:,}") for _, s in self.files), default=0)
        lines = [f"  {s:>{width},} B  {p}" for p, s in self.files]
        lines.append(f"  {len(self.files)} files, {human_bytes(self.total_bytes)} ({self.total_bytes:,} bytes)")
        return "\n".join(lines)


def plan_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of exactly what `upload_folder` sends: its own listing and filter, our patterns."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    folder = Path(folder).expanduser().resolve()
    rel = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(rel.keys(), ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    return [(path, rel[path].stat().st_size) for path in kept]


def push_folder(folder: str | Path, repo_id: str, *, dry_run: bool = False, private: bool = True,
                kind: str | None = None, commit_message: str | None = None, api=None) -> PushResult:
    """Check the folder (refuse if it fails), then create the repo and upload; dry_run only lists the files.

    `api` is an HfApi-like object (create_repo, upload_folder); None builds huggingface_hub's HfApi.
    """
    folder = Path(folder).expanduser()
    if dry_run:
        check = check_folder(folder, kind).raise_if_failed()
        return PushResult(repo_id, folder, plan_upload(folder), dry_run, private, check, warnings=list(check.warnings))
    with _run_of(folder):  # a release folder of a run is not replaced (`--overwrite`) while it uploads
        return _push(folder, repo_id, private, kind, commit_message, api)


def _run_of(folder: Path):
    run = RunDir.of(folder.parent.parent)  # RUN/release/<stage>
    return hold(run, "release push", create=False) if run.exists() else contextlib.nullcontext()


def _push(folder: Path, repo_id: str, private: bool, kind: str | None, commit_message: str | None,
          api) -> PushResult:
    check = check_folder(folder, kind).raise_if_failed()
    files = plan_upload(folder)
    result = PushResult(repo_id, folder, files, False, private, check, warnings=list(check.warnings))
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise EnvironmentNotReady("no Hugging Face token: set HF_TOKEN in the environment or run "
                                      "`hf auth login` (a token with write access)")
        api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message or f"Upload {check.kind} with fine-tune-llm",
                                   ignore_patterns=list(IGNORE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - HTTP errors, no connection, bad repo id: one message naming the cause
        raise EnvironmentNotReady(f"upload of {folder} to {repo_id} failed ({type(exc).__name__}: "
                                  f"{str(exc)[:300]})") from None
    result.commit_url = str(getattr(commit, "commit_url", None) or commit)
    log.info("pushed %d files (%s) to %s", len(files), human_bytes(result.total_bytes), repo_id)
    return result
