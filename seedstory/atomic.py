"""Writing a file or a folder all at once: a reader sees the old one or the new one, never half of either. What is
written gets the permissions a plainly created file or folder would (the temporary ones are private)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str, fill: Callable[[BinaryIO], None], private: bool = False) -> str:
    """``fill(f)`` writes the new content into a temporary file beside ``path``, which then replaces ``path``.
    On any failure ``path`` is left as it was. ``private``: readable by its owner only (a secret)."""
    return write_path(path, lambda tmp: _fill(tmp, fill), private)


def write_path(path: str, save: Callable[[str], None], private: bool = False) -> str:
    """As ``write_file`` for writers that take a file name (``safetensors.torch.save_file``, ``torch.save``):
    ``save(tmp)`` writes a temporary file beside ``path``, which then replaces ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o600 if private else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str, private: bool = False) -> str:
    """``text`` (UTF-8) as the whole new content of ``path``, as ``write_file``."""
    return write_file(path, lambda f: f.write(text.encode("utf-8")), private)


def write_json(path: str, data, indent: int = 2) -> str:
    """``data`` as JSON (non-ASCII kept, a final newline), as ``write_file``."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _fill(tmp: str, fill: Callable[[BinaryIO], None]) -> None:
    with open(tmp, "wb") as f:
        fill(f)


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
