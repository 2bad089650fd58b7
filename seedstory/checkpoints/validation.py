"""Checking a state dict (tensors, meta tensors or shapes) against a module's ``{key: shape}``, and
assigning checked tensors into a module. A loaded module never comes out half-initialized: each parameter
comes from the file or from a named base, otherwise CheckpointError lists what is missing; unknown keys are
reported by family (``key_family``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch

from .files import CheckpointError


def shape_of(v) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)


def key_family(key: str) -> str:
    """A key's module path with indices starred: ``unet.down_blocks.1.resnets.0.conv1.weight`` ->
    ``unet.down_blocks.*.resnets.*.conv1``."""
    parts = ["*" if p.isdigit() else p for p in key.split(".")]
    return ".".join(parts[:-1]) if len(parts) > 1 else key


def first_few(items: list, n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def unknown_keys_error(file: str, keys: list[str], what: str) -> CheckpointError:
    fams = sorted({key_family(k) for k in keys})
    return CheckpointError(
        f"{file}: {len(keys)} key(s) do not belong to {what} (unknown key families: {first_few(fams)}); "
        f"first keys: {first_few(sorted(keys))}. Is this the right file for this component?"
    )


def shape_mismatch_error(file: str, bad: list[tuple[str, tuple, tuple]], what: str) -> CheckpointError:
    desc = first_few([f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in bad], 4)
    return CheckpointError(
        f"{file}: shape mismatch for {len(bad)} key(s) of {what}: {desc}. "
        "The model configuration does not match this checkpoint."
    )


def check_state_dict(
    file: str,
    state: Mapping,
    expected: Mapping[str, Iterable[int]],
    what: str = "the model",
    base: Optional[str] = None,
    defaults: Iterable[str] = (),
) -> list[str]:
    """Check a file's state dict (tensors or shapes) against a module's ``{key: shape}``.

    Raises CheckpointError on keys the module does not have, on shape mismatches, and on module keys the
    file lacks, unless ``base`` names where those come from (e.g. the SDXL base UNet) or they are listed in
    ``defaults`` (deterministic values). Returns the module keys the file lacks."""
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise unknown_keys_error(file, unknown, what)
    bad = [(k, shape_of(v), tuple(expected[k])) for k, v in state.items() if shape_of(v) != tuple(expected[k])]
    if bad:
        raise shape_mismatch_error(file, bad, what)
    missing = [k for k in expected if k not in state]
    if missing and base is None:
        hard = [k for k in missing if k not in set(defaults)]
        if hard:
            raise CheckpointError(
                f"{file}: {len(hard)} parameter(s) of {what} are missing from the file and have no base to come "
                f"from: {first_few(hard)}"
            )
    return missing


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def empty_init():
    """Context manager: parameters are created on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def without_weights(build: Callable[[], torch.nn.Module], dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """``build()``'s module without weights: its parameters on the meta device (no memory), its buffers real (they
    are computed at construction, e.g. rotary frequencies, and no checkpoint carries the non-persistent ones), cast
    to ``dtype``: what a training process other than the first loads of what FSDP or ZeRO-3 fill in from the
    first one's copy, and of what it does not use."""
    with empty_init():
        module = build()
    # (torch's own ``to``: diffusers' ModelMixin.to warns on every dtype it is given)
    return torch.nn.Module.to(module, dtype=dtype) if dtype is not None else module


def from_folder(model_cls, folder: str, dtype: Optional[torch.dtype] = None, weightless: bool = False, **kwargs):
    """A diffusers-style model (``ModelMixin``/``ConfigMixin``, ours included) saved in ``folder``, in ``dtype``:
    ``from_pretrained``, or with ``weightless`` its structure alone, from the folder's config (``without_weights``)."""
    if weightless:
        return without_weights(lambda: model_cls.from_config(model_cls.load_config(folder)), dtype)
    return model_cls.from_pretrained(folder, **({"torch_dtype": dtype} if dtype is not None else {}), **kwargs)


def assign_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> None:
    """Load ``state`` into ``module``: complete state into a meta-initialized module (by assignment, cast to
    ``dtype`` or the module's dtypes), otherwise copied into the existing parameters (a subset is fine: the
    caller has checked where the rest comes from)."""
    own = module.state_dict()
    if any(t.is_meta for t in own.values()):
        cast = {k: v.to(dtype=dtype or own[k].dtype, copy=True) for k, v in state.items()}
        module.load_state_dict(cast, strict=True, assign=True)
    else:
        module.load_state_dict(dict(state), strict=False)


__all__ = [
    "assign_state", "check_state_dict", "empty_init", "first_few", "from_folder", "key_family", "module_shapes",
    "shape_mismatch_error", "shape_of", "unknown_keys_error", "without_weights",
]
