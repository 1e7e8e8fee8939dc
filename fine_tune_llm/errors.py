"""Errors the user can act on. The CLI prints their message alone, without a traceback."""

import os

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def secrets() -> list[str]:
    """The Hub token(s) this process could send: environment first, then the login cache."""
    found = {os.environ.get(name) for name in TOKEN_VARIABLES}
    try:
        from huggingface_hub import get_token

        found.add(get_token())
    except Exception:  # noqa: BLE001, S110 - no huggingface_hub, unreadable cache: nothing more to hide
        pass
    return sorted((s for s in found if s and len(s) >= 8), key=len, reverse=True)


def redact(text: str) -> str:
    """Library messages can echo request details; a token must never reach a log, file or terminal."""
    for secret in secrets():
        text = text.replace(secret, "<redacted>")
    return text


class FineTuneError(Exception):
    """Base class: a clear message naming the file, row, column or option at fault."""

    def __init__(self, message: str = "", *args):
        super().__init__(redact(str(message)), *args)


class ConfigError(FineTuneError):
    pass


class DataError(FineTuneError):
    pass


class EnvironmentNotReady(FineTuneError):
    """Missing GPU, unreachable Hub, missing optional dependency."""


class TrainingDiverged(FineTuneError):
    pass


class ReleaseCheckFailed(FineTuneError):
    pass


class RunInUse(FineTuneError):
    """Another process writes this run directory now (run_lock.py)."""


class DiskFull(FineTuneError):
    """A save did not fit (or would not: checked first); nothing half-written was left behind."""


class DamagedFile(FineTuneError):
    """A file a stage needs is cut short or garbled; the message says which stage writes it again."""
