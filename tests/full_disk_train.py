"""`python -m tests.full_disk_train PATTERN TRAIN-ARGS...`: `fine-tune-llm train` on a disk that fills up.

Every torch.save into a path containing PATTERN writes a few bytes, then fails as a full disk does
(OSError ENOSPC), so a test can end a save midway without filling a real filesystem.
"""

from __future__ import annotations

import errno
import os
import sys

import torch

from fine_tune_llm.cli import main

PATTERN = sys.argv[1]
_save = torch.save


def save_on_a_full_disk(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and PATTERN in str(f):
        with open(f, "wb") as fh:  # a real full disk leaves the start of the file behind
            fh.write(b"PK\x03\x04 cut short")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return _save(obj, f, *args, **kwargs)


torch.save = save_on_a_full_disk

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[2:]]))
