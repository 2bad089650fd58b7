"""The released visual tokenizer (``visual_tokenizer/qwen_vit_G.pt``, or ``qwen_vit_G.safetensors``; docs/formats.md
§4): a plain state dict of Qwen-VL-Chat's ``transformer.visual`` whose names are identical to
``QwenVisionTransformer``'s. ``load_release_visual_tokenizer(path, vit_kwargs)``.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Optional

import torch

from .files import read_state_dict
from .layout import require_file
from .validation import assign_state, check_state_dict, empty_init, module_shapes, without_weights

VISUAL_TOKENIZER_NAMES = ("qwen_vit_G.pt", "qwen_vit_G.safetensors")


def resolve_visual_tokenizer_path(path: str) -> str:
    """The visual tokenizer file a preset path stands for: the path itself when it exists; for a folder, the
    first of ``VISUAL_TOKENIZER_NAMES`` in it; otherwise the same name with the other extension
    (``qwen_vit_G.pt`` <-> ``qwen_vit_G.safetensors``, what ``python -m seedstory extract-vit`` writes).
    Returns ``path`` unchanged when none exists."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in VISUAL_TOKENIZER_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        return os.path.join(path, VISUAL_TOKENIZER_NAMES[0])
    stem, ext = os.path.splitext(path)
    if ext.lower() in (".pt", ".pth", ".bin", ".safetensors"):
        for alt in (".pt", ".safetensors", ".pth", ".bin"):
            if os.path.isfile(stem + alt):
                return stem + alt
    return path


def vit_shapes(config: Optional[Mapping]) -> dict[str, tuple[int, ...]]:
    return dict(_vit_shapes_cached(json.dumps(dict(config or {}), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _vit_shapes_cached(config_json: str) -> tuple:
    from ..models.qwen_vit import QwenVisionTransformer

    with torch.device("meta"):
        return tuple(module_shapes(QwenVisionTransformer(**json.loads(config_json))).items())


def check_release_visual_tokenizer(path: str, config: Optional[Mapping] = None,
                                   state: Optional[Mapping] = None) -> dict[str, tuple[int, ...]]:
    """Check a visual tokenizer file (or ``state``: tensors, meta tensors or shapes) against
    ``QwenVisionTransformer(**config)``; returns the expected ``{key: shape}``."""
    path = resolve_visual_tokenizer_path(path)
    require_file(path, ("visual_tokenizer",))
    expected = vit_shapes(config)
    check_state_dict(path, read_state_dict(path) if state is None else state, expected,
                     what="the visual tokenizer (QwenVisionTransformer)")
    return expected


def load_release_visual_tokenizer(path: str, config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                                  weightless: bool = False):
    """``visual_tokenizer/qwen_vit_G.pt`` (or ``qwen_vit_G.safetensors``, see ``resolve_visual_tokenizer_path``)
    -> ``QwenVisionTransformer(**config)`` (release defaults when ``config`` is None). The file is a plain state
    dict with our names; all 594 keys are required. ``weightless``: the structure alone, the file not read."""
    from ..models.qwen_vit import QwenVisionTransformer

    path = resolve_visual_tokenizer_path(path)
    require_file(path, ("visual_tokenizer",))
    if weightless:
        return without_weights(lambda: QwenVisionTransformer(**(config or {})), dtype or torch.float32).eval()
    state = read_state_dict(path)
    with empty_init():
        vit = QwenVisionTransformer(**(config or {}))
    check_state_dict(path, state, module_shapes(vit), what="the visual tokenizer (QwenVisionTransformer)")
    assign_state(vit, state, dtype or torch.float32)
    return vit.eval()


__all__ = [
    "VISUAL_TOKENIZER_NAMES", "check_release_visual_tokenizer", "load_release_visual_tokenizer",
    "resolve_visual_tokenizer_path", "vit_shapes",
]
