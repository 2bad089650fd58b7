"""Reading files without knowing which module they are for: state dicts from ``.bin``/``.pt``/``.pth``
(only ever opened with ``torch.load(weights_only=True)``) or ``.safetensors``; names, shapes and dtypes from a
file's header alone (``inspect_checkpoint``, ``meta_state``); JSON. ``CheckpointError`` is what every checkpoint
module raises for a file that is missing, unreadable or does not fit.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch


class CheckpointError(Exception):
    """A release file is missing, unreadable, or does not match the module it is loaded into."""


class _SafetensorsDict(Mapping):
    """Read-only mapping over a .safetensors file; tensors are read on access."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._f = safe_open(path, framework="pt", device="cpu")
        self._keys = list(self._f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _torch_load(path: str, mmap: bool):
    """``torch.load(weights_only=True)`` with errors turned into CheckpointError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"{path}: refused: the pickle holds objects other than tensors, and release files are only "
                f"opened with torch.load(weights_only=True) ({msg[:200]})"
            ) from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg[:200]})") from e


def _as_state_dict(path: str, obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "module"):
            if isinstance(obj.get(wrapper), Mapping) and not isinstance(obj.get(wrapper), torch.Tensor):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: not a state dict (entry {k!r} is a {type(v).__name__}, not a tensor)")
    return obj


def read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """Read a state dict from ``.bin``/``.pt``/``.pth`` (``torch.load(weights_only=True)``, memory-mapped when
    the file is a zip-format pickle) or ``.safetensors`` (tensors read lazily). A top-level ``{"state_dict":
    ...}`` or ``{"module": ...}`` wrapper is unwrapped. Anything else raises CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found")
    low = path.lower()
    if low.endswith(".safetensors"):
        try:
            return _SafetensorsDict(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if not low.endswith((".bin", ".pt", ".pth")):
        raise CheckpointError(f"{path}: unsupported checkpoint type (expected .bin, .pt, .pth or .safetensors)")
    return _as_state_dict(path, _torch_load(path, mmap=zipfile.is_zipfile(path)))


@dataclass(frozen=True)
class TensorMeta:
    """What a checkpoint says about one tensor, read without its data."""

    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


# safetensors dtype name -> (torch dtype or None when this torch lacks it, bytes per element)
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
              "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


def safetensors_header(path: str) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes from a ``.safetensors`` header (the first few KiB of the file); checks that the
    file is as long as its header says (a truncated download fails here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or 8 + n > size or n > 512 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; no valid header)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    out, end = {}, 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            name, itemsize = _ST_DTYPES.get(v["dtype"], (None, None))
            shape = tuple(int(d) for d in v["shape"])
            start, stop = (int(x) for x in v["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header entry {k!r})") from e
        meta = TensorMeta(shape, getattr(torch, name, None) if name else None)
        if itemsize is not None and stop - start != meta.numel * itemsize:
            raise CheckpointError(f"{path}: corrupt header: {k} {list(shape)} {v['dtype']} does not fit "
                                  f"{stop - start} bytes")
        out[k], end = meta, max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the file has {size:,} bytes but its header describes "
                              f"{8 + n + end:,}; download it again")
    return out


def inspect_checkpoint(path: str) -> Optional[dict[str, TensorMeta]]:
    """``{key: TensorMeta}`` of a checkpoint without reading tensor data: the header of a ``.safetensors``
    file, or a memory-mapped ``torch.load(weights_only=True)`` of a zip-format ``.bin``/``.pt`` (only the
    pickle is read; tensors stay unread on disk). Returns None for a legacy (pre-zip) pickle, which cannot be
    inspected without loading it. Raises CheckpointError for missing, truncated or unreadable files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found")
    low = path.lower()
    if low.endswith(".safetensors"):
        return safetensors_header(path)
    if not low.endswith((".bin", ".pt", ".pth")):
        raise CheckpointError(f"{path}: unsupported checkpoint type (expected .bin, .pt, .pth or .safetensors)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not zipfile.is_zipfile(path):
        if magic.startswith(b"PK"):
            raise CheckpointError(f"{path}: truncated or corrupt ({os.path.getsize(path):,} bytes; the zip "
                                  "directory at its end is missing); download it again")
        if magic[:1] == b"\x80":
            return None  # legacy torch.save pickle: no random access
        raise CheckpointError(f"{path}: not a PyTorch checkpoint")
    state = _as_state_dict(path, _torch_load(path, mmap=True))
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in state.items()}


def meta_state(info: Mapping[str, TensorMeta]) -> dict[str, torch.Tensor]:
    """Data-less stand-ins (meta tensors) for the tensors ``inspect_checkpoint`` describes, so the loaders'
    checks run on a file's header alone."""
    return {k: torch.empty(m.shape, dtype=m.dtype or torch.float32, device="meta") for k, m in info.items()}


def read_json(path: str, what: str) -> dict:
    """A JSON file's contents; a missing or unreadable file raises CheckpointError saying ``what`` it should be."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e


__all__ = [
    "CheckpointError", "TensorMeta", "inspect_checkpoint", "meta_state", "read_json", "read_state_dict",
    "safetensors_header",
]
