"""Writing a folder all at once: a reader sees the old folder or the new one, never half of either."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def write_dir(out: str, fill: Callable[[str], None]) -> str:
    """``fill(tmp)`` writes the new content into a temporary folder beside ``out``, which then replaces
    ``out`` (moved aside first, removed after). On any failure ``out`` is left as it was."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        fill(tmp)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
