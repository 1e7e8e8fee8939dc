"""The release pipeline: adapter -> merged bf16 model -> GGUF, each folder checked, and a Hub push.

Every stage is a plain function (for notebooks) behind a `fine-tune-llm release ...` subcommand. Each writes into
a staging folder that becomes the release folder only once its own check passes.
"""

from .adapter import check_adapter, release_adapter
from .common import CheckResult
from .folders import check_folder
from .gguf_export import check_gguf, export_gguf
from .merge import check_merged, merge_adapter
from .push import plan_upload, push_folder

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
