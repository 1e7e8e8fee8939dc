"""The release pipeline: adapter -> merged bf16 model -> GGUF, each folder checked, and a Hub push.

Every stage is a plain function (for notebooks) behind a `fine-tune-llm release ...` subcommand.
"""

from .adapter import check_adapter, release_adapter
from .checks import check_folder
from .common import CheckResult

__all__ = [
    "CheckResult",
    "check_adapter",
    "check_folder",
    "check_gguf",
    "check_merged",
    "export_gguf",
    "merge_adapter",
    "plan_upload",
    "push_folder",
    "release_adapter",
]


def __getattr__(name):  # the heavier stages import on first use
    if name in ("merge_adapter", "check_merged"):
        from . import merge

        return getattr(merge, name)
    if name in ("export_gguf", "check_gguf"):
        from . import gguf_export

        return getattr(gguf_export, name)
    if name in ("push_folder", "plan_upload"):
        from . import push

        return getattr(push, name)
    raise AttributeError(name)
