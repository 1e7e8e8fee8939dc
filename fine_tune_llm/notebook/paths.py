"""Small things the notebooks need: paths that work from any working directory, and headless detection."""

from __future__ import annotations

import os
from pathlib import Path

# Headless runners (tests, CI, papermill) set this so cells that start servers or wait for a person skip.
HEADLESS_ENV = "FINE_TUNE_LLM_HEADLESS"


def repo_root() -> Path:
    """The repository the package was installed from (Poetry installs it editable), else the working dir.

    A kernel started by VS Code runs in the notebook's folder (notebooks/), one started from a terminal
    often in the repository root: resolving against the repository makes both write to the same place.
    """
    root = Path(__file__).resolve().parents[2]  # fine_tune_llm/notebook/paths.py -> the repository
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def repo_path(path: str | Path | None) -> str | None:
    """An absolute path for a repository-relative one; absolute paths and None pass through."""
    if path is None:
        return None
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else repo_root() / path)


def interactive() -> bool:
    """True in a notebook someone is looking at; False in a terminal or under a headless runner."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in (HEADLESS_ENV, "CI")):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config
