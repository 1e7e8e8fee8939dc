"""File helpers every stage uses: content hashes, atomic writes, appends several processes share, free space,
and whether a weights file is whole."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DiskFull

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# torch.save writes through its own C++ stream and reports a full disk without an errno.
TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "unexpected pos", "PytorchStreamWriter failed")
NEARLY_FULL = 64 * 2**20  # below this much free space, a failed torch write is taken for a full disk


def cache_root() -> Path:
    """Built models (tiny, GGUF rewrites) and downloaded tools: FINE_TUNE_LLM_CACHE or ~/.cache/fine_tune_llm."""
    return Path(os.environ.get("FINE_TUNE_LLM_CACHE", Path.home() / ".cache" / "fine_tune_llm"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- free space -------------------------------------------------------------------------------------------------

def free_bytes(path: str | Path) -> int:
    """Space this user may still write on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the chain, a library's message saying so
    (safetensors: "No space left on device"), or torch's errno-less stream failure on a nearly full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, DiskFull) or (isinstance(seen, OSError) and seen.errno in NO_SPACE):
            return True
        if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
            return True
        if path is not None and isinstance(seen, RuntimeError) and any(s in text for s in TORCH_WRITE_FAILURES):
            return free_bytes(path) < NEARLY_FULL
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full(path: str | Path, need: int | None, what: str, hint: str, free: int | None = None) -> DiskFull:
    """The one message a full disk gives: where, how much was needed and is free, and what to do."""
    free = free_bytes(path) if free is None else free
    needs = f"needs at least {human_bytes(need)}" if need else "did not fit"
    return DiskFull(f"no space left on the disk holding {path}: {what} {needs}, {human_bytes(free)} free. {hint}")


def require_space(path: str | Path, need: int, what: str, hint: str) -> None:
    """Refuse before writing when `need` bytes cannot fit (a cheap statvfs, before any byte is written)."""
    if need > free_bytes(path):
        raise disk_full(path, need, what, hint)


AGAIN = "Free some space and run the same command again."


@contextlib.contextmanager
def replaced(path: str | Path, need: int = 0, what: str | None = None, hint: str = AGAIN) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write; it replaces `path` when the block ends without an
    error and is removed otherwise, so a reader sees the old file or the new one, never half. The temporary name
    is unique: two processes writing one path (two runs' shared metrics) cannot mix their bytes."""
    path = Path(path)
    what = what or f"writing {path.name}"
    require_space(path.parent, need, what, hint)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        full = is_disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(path.parent, need or None, what, hint) from None
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    """Write a temporary file beside `path`, fsync, rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    data = text.encode()
    with replaced(path, need=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
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


def replace_folder(staging: Path, final: Path) -> Path:
    """Put a fully written `staging` folder in place of `final` (two renames; `final` is never half-written)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def locked_append(path: str | Path) -> Iterator[tuple[str, io.StringIO]]:
    """Append to a file several processes share (metrics/runs.csv): yields its first line (a header, or "") and a
    buffer for the new lines, which are written in one go under an exclusive lock held from the read to the write.
    A final line left without its newline (a writer that died mid-line) is closed first, and an append that fails
    is cut back off: concurrent runs leave only whole lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path)
    try:
        size = os.fstat(fd).st_size
        buffer = io.StringIO(newline="")
        yield os.pread(fd, 1 << 16, 0).decode(errors="replace").partition("\n")[0], buffer
        data = buffer.getvalue().encode()
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        _append(fd, data, size, path)
    finally:
        os.close(fd)


def _open_locked(path: Path) -> int:
    """The file, open and exclusively locked (released when it closes, or when the process dies). A writer that
    waited while locked_rewrite put a new file in place locks that one, not the replaced file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def locked_rewrite(path: str | Path, transform) -> None:
    """Replace a shared file's text with transform(text), under the lock locked_append takes: the new file is
    written beside it and renamed into place, so a reader or a crash sees the old file or the new one."""
    path = Path(path)
    fd = _open_locked(path)
    try:
        with open(path, newline="") as fh:
            text = fh.read()
        new = transform(text)
        if new != text:
            with replaced(path) as tmp:
                tmp.write_text(new, newline="")
    finally:
        os.close(fd)


def _append(fd: int, data: bytes, size: int, path: Path) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException as exc:
        os.ftruncate(fd, size)
        if is_disk_full(exc, path.parent):
            raise disk_full(path, None, f"adding a row to {path.name}", AGAIN) from None
        raise


# --- whole or damaged ---------------------------------------------------------------------------------------------

def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file cannot be whole (cut short, garbled header), or None. Reads only its header: the
    file's length must be exactly what the header describes."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, not even a header: it was cut short"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            return f"it has {size:,} bytes but its header alone claims {n + 8:,}: it was cut short or is garbled"
        try:
            header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not readable: the file is garbled"
    want = 8 + n + end
    if size != want:
        return (f"it has {size:,} bytes, its header describes {want:,}: it was "
                f"{'cut short' if size < want else 'written over'}")
    return None


def json_problem(path: str | Path) -> str | None:
    """Why a JSON file does not read as an object, or None."""
    try:
        obj = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        return "it is not text: the file is garbled"
    except ValueError as exc:
        return f"it is not valid JSON ({exc}): it was cut short or garbled"
    return None if isinstance(obj, dict) else f"it holds a {type(obj).__name__}, not a JSON object"
