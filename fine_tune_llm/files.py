"""File helpers every stage uses: content hashes, atomic writes, the cache folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Built models (tiny, GGUF rewrites) and downloaded tools: FINE_TUNE_LLM_CACHE or ~/.cache/fine_tune_llm."""
    return Path(os.environ.get("FINE_TUNE_LLM_CACHE", Path.home() / ".cache" / "fine_tune_llm"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, text: str) -> Path:
    """Write a temporary file beside `path`, fsync, rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or not an object (callers report what they need)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
