"""The packaged key manifests of the released files (``manifests/*.json.gz``): every key, shape and
role the reference modules have (docs/formats.md §1), with the counts and configs recorded beside them. They
stand in for the files themselves wherever the files are not at hand.
"""
from __future__ import annotations

import functools
import gzip
import json
import os

from .layout import RELEASE_FILES

MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests")
ROLES = {"t": "trainable", "f": "frozen", "b": "buffer", "p": "parameter"}


@functools.lru_cache(maxsize=None)
def _manifest(name: str) -> dict:
    path = os.path.join(MANIFEST_DIR, name + ".json.gz")
    if not os.path.isfile(path):
        names = sorted(f[: -len(".json.gz")] for f in os.listdir(MANIFEST_DIR) if f.endswith(".json.gz"))
        raise KeyError(f"no packaged manifest {name!r}; available: {names}")
    with gzip.open(path, "rt") as f:
        return json.load(f)


def release_manifest(name: str, roles: bool = False) -> dict:
    """``{key: shape}`` of a released file (every key the reference module has; docs/formats.md §1), or with
    ``roles`` ``{key: (shape, role)}``, role one of trainable / frozen / buffer / parameter.
    ``name``: a manifest name (``agent_seed_story_george_sft``, ``agent_seedx_pretrained``,
    ``detokenizer_pretrained``, ``detokenizer_george_adapted``, ``qwen_vit_G``) or a RELEASE_FILES name."""
    if name in RELEASE_FILES and RELEASE_FILES[name].manifest:
        name = RELEASE_FILES[name].manifest
    keys = _manifest(name)["keys"]
    if roles:
        return {k: (tuple(v[0]), ROLES[v[1]]) for k, v in keys.items()}
    return {k: tuple(v[0]) for k, v in keys.items()}


def release_manifest_summary(name: str) -> dict:
    """Counts and configs recorded with a manifest (e.g. ``sdxl_unet_config`` for the de-tokenizers)."""
    if name in RELEASE_FILES and RELEASE_FILES[name].manifest:
        name = RELEASE_FILES[name].manifest
    return dict(_manifest(name)["summary"])


__all__ = ["release_manifest", "release_manifest_summary"]
