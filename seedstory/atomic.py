"""Writing a file or a folder all at once: a reader sees the old one or the new one, never half of either. What is
written gets the permissions a plainly created file or folder would (the temporary ones are private)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str, fill: Callable[[BinaryIO], None]) -> str:
    """``fill(f)`` writes the new content into a temporary file beside ``path``, which then replaces ``path``.
    On any failure ``path`` is left as it was."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_dir(out: str, fill: Callable[[str], None]) -> str:
    """``fill(tmp)`` writes the new content into a temporary folder beside ``out``, which then replaces
    ``out`` (moved aside first, removed after). On any failure ``out`` is left as it was."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
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
