"""Release folders by kind: how each is recognised and which check it must pass. A push refuses any folder
whose check has errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .adapter import check_adapter
from .common import CheckResult
from .gguf_export import check_gguf
from .merge import check_merged


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _is_gguf(folder: Path) -> bool:
    return bool(list(folder.glob("*.gguf")))


def _is_merged(folder: Path) -> bool:
    return (folder / "config.json").is_file() and bool(list(folder.glob("*.safetensors")))


# kind -> (how the folder is recognised, its check), tried in this order.
KINDS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], CheckResult]]] = {
    "adapter": (_is_adapter, check_adapter),
    "gguf": (_is_gguf, check_gguf),
    "merged": (_is_merged, check_merged),
}


def detect_kind(folder: Path) -> str | None:
    return next((kind for kind, (recognise, _) in KINDS.items() if recognise(folder)), None)


def check_folder(folder: str | Path, kind: str | None = None) -> CheckResult:
    """The folder's own check, by kind (detected from its files when not given)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return CheckResult(folder, kind or "release", errors=[f"{folder} is not a directory"])
    kind = kind or detect_kind(folder)
    if kind in KINDS:
        return KINDS[kind][1](folder)
    return CheckResult(folder, "release", errors=[
        (f"{folder} is not a release folder: expected adapter_config.json (adapter), config.json + *.safetensors "
         f"(merged model) or *.gguf files (GGUF)")])
