"""One writer per run directory: training, the preference stage, evaluation and each release stage hold RUN/.lock
for their lifetime; readers (TensorBoard, `--help`, a dry run, `release check`) take no lock.

The lock is the operating system's (fcntl.flock on RUN/.lock), so a process that dies, even by SIGKILL, releases
it at once: a stale lock never blocks. The holder writes who it is (host, pid, command, what it does, since when)
into the file, and a second writer stops before any heavy work with one message naming it.

While held, RUN/.lock names the holder, and a clean release empties it; a process killed outright leaves its
record behind (so the content alone proves no live hold), and the next holder overwrites it.

Under `accelerate launch` the main process (rank 0) holds the lock for the whole job and the other ranks take
none: they write into the run directory only after the Trainer's process group has formed, which needs rank 0,
and a rank 0 refused the lock exits, so the launcher stops them.

Within one process the lock is re-entrant (the demo trains, then evaluates, under one hold).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import RunInUse
from .run import RunDir

log = logging.getLogger(__name__)
_held: dict[str, list[int]] = {}  # the lock file's real path -> [descriptor, depth]
_guard = threading.Lock()


def is_main_process() -> bool:
    """Rank 0, or a single process. Read from the launcher's environment: a PartialState() made before the
    Trainer's own reports one process under torchrun on CPU, and every rank would write the run files."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    return True


@contextlib.contextmanager
def hold(run: RunDir | str | Path, what: str, create: bool = True) -> Iterator[RunDir]:
    """Hold the run directory's lock while the block runs; raises RunInUse naming the holder when another process
    has it. `create`: make the directory (a new run) rather than expect it."""
    run = RunDir.of(run)
    if not is_main_process():
        yield run
        return
    key = os.path.realpath(run.lock_file)
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            created = run.path if create and not run.path.exists() else None
            _held[key] = [_acquire(run, what, create), 1, created]  # fd, holds in this process, folder made
    try:
        yield run
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd, _, created = _held.pop(key)
                _remove_if_only_the_lock(created, run)  # a start that failed before writing leaves nothing
                _release(fd)


def _remove_if_only_the_lock(created: Path | None, run: RunDir) -> None:
    """Delete a directory this hold created when the lock file is all it holds (still locked: no one can be in it)."""
    if created is not None and [p.name for p in created.iterdir()] == [run.lock_file.name]:
        run.lock_file.unlink()
        created.rmdir()


def _acquire(run: RunDir, what: str, create: bool) -> int | None:
    if create:
        run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _read_holder(fd)
        os.close(fd)
        raise RunInUse(in_use_message(run, who)) from None
    except OSError as exc:  # a filesystem without flock (some network mounts): run, but say what is unguarded
        os.close(fd)
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("cannot lock %s (%s): a second process writing this run directory would not be stopped",
                    run.lock_file, exc.strerror)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me(what)) + "\n").encode(), 0)
    return fd


def _release(fd: int | None) -> None:
    if fd is None:
        return
    os.ftruncate(fd, 0)  # still held: nobody reads a half-cleared file
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def me(what: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command_line(), "what": what,
            "since": datetime.now().astimezone().isoformat(timespec="seconds")}


def command_line() -> str:
    argv = list(sys.argv) or [""]
    if Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "fine_tune_llm":
        argv[0:1] = ["python", "-m", "fine_tune_llm"]
    elif argv[0] in ("-c", ""):  # python -c CODE, or an interactive session
        argv[0:1] = ["python", "-c"] if argv[0] else ["python"]
    return shlex.join(argv)


def _read_holder(fd: int, wait: float = 1.0) -> dict[str, Any]:
    """The holder's record; it writes it right after locking, so an empty file is retried for a moment."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def in_use_message(run: RunDir, who: dict[str, Any]) -> str:
    if not who:
        return (f"{run.path} is in use by another process (it has not said which yet; see {run.lock_file}). One "
                f"process writes a run directory at a time: wait for it to finish, or use another run directory.")
    since, ago = who.get("since", "?"), ""
    with contextlib.suppress(TypeError, ValueError):
        ago = f" ({_duration(time.time() - datetime.fromisoformat(since).timestamp())} ago)"
    pid, host = who.get("pid"), who.get("host", "?")
    gone = (" (that process has exited; a process it started still holds the lock)"
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid) else "")
    return (f"{run.path} is in use: {who.get('what', 'a stage')} by pid {pid} on {host}{gone}, since {since}{ago}, "
            f"command: {who.get('command', '?')}. One process writes a run directory at a time (two would mix their "
            f"checkpoints, logs and adapter): wait for it to finish or stop it, or use another run directory.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h {seconds % 3600 // 60} min"
