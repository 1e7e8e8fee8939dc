"""Errors the user can act on. The CLI prints their message alone, without a traceback."""


class FineTuneError(Exception):
    """Base class: a clear message naming the file, row, column or option at fault."""


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
