"""The released de-tokenizers (``detokenizer_pretrained/...``, ``detokenizer/detokenizer_george_adapted/...``;
docs/formats.md §3): ``resampler.*`` (our ``ResamplerXL``) and ``unet.*`` (diffusers SDXL UNet names), applied
on top of the SDXL base folder (diffusers layout), whose weight files and component shapes are read here too.
``load_release_detokenizer(path, "pretrained/stable-diffusion-xl-base-1.0", resampler_kwargs)``.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Optional

import torch

from .files import CheckpointError, inspect_checkpoint, meta_state, read_json, read_state_dict
from .layout import DETOKENIZER_FILES, RELEASE_FILES, require_file
from .validation import (
    assign_state,
    check_state_dict,
    empty_init,
    from_folder,
    first_few,
    module_shapes,
    shape_mismatch_error,
    shape_of,
    unknown_keys_error,
    without_weights,
)


def split_detokenizer_state(path: str, state) -> tuple[dict, dict]:
    """A released de-tokenizer file's tensors as (``resampler.*``, ``unet.*``) without their prefixes; any other
    key family is refused."""
    res, un, other = {}, {}, []
    for k in state:
        if k.startswith("resampler."):
            res[k[len("resampler."):]] = state[k]
        elif k.startswith("unet."):
            un[k[len("unet."):]] = state[k]
        else:
            other.append(k)
    if other:
        raise unknown_keys_error(path, other, "a SEED-Story de-tokenizer (resampler.* and unet.*)")
    return res, un


def load_release_detokenizer_weights(path: str, resampler, unet) -> tuple:
    """Apply a released de-tokenizer file: ``resampler.*`` -> ``resampler`` (a ``ResamplerXL``; every key
    required) and ``unet.*`` -> ``unet`` (an SDXL ``UNet2DConditionModel`` already holding the SDXL base
    weights; full files override all of them, trainable-only files just the 280 attn to_k/to_v weights).
    Returns ``(resampler, unet)``."""
    require_file(path, DETOKENIZER_FILES)
    state = read_state_dict(path)
    res, un = split_detokenizer_state(path, state)
    check_state_dict(path, res, module_shapes(resampler), what="the de-tokenizer resampler (resampler.*)")
    check_state_dict(path, un, module_shapes(unet), what="the SDXL UNet (unet.*)",
                     base="the SDXL base UNet (stable-diffusion-xl-base-1.0/unet)")
    if any(p.is_meta for p in unet.parameters()):
        raise CheckpointError("load the SDXL base UNet before applying a de-tokenizer file to it")
    assign_state(resampler, res, None)
    assign_state(unet, un, None)
    return resampler, unet


def _diffusers_local(cls, root: str, subfolder: str, dtype: Optional[torch.dtype]):
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return cls.from_pretrained(root, subfolder=subfolder, local_files_only=True, **kw)
    except OSError as first:
        try:  # folders that only hold the fp16 variant
            return cls.from_pretrained(root, subfolder=subfolder, local_files_only=True, variant="fp16", **kw)
        except OSError:
            raise CheckpointError(f"{os.path.join(root, subfolder)}: cannot load {cls.__name__} ({first})") from first


def load_release_detokenizer(path: str, sdxl_dir: str, resampler_config: dict, dtype: Optional[torch.dtype] = None,
                             weightless: bool = False):
    """A released de-tokenizer file on top of the SDXL base folder (diffusers layout). Returns
    ``(resampler, unet, vae, scheduler)``: ``ResamplerXL(**resampler_config)`` and the UNet in ``dtype``
    (default fp32), the SDXL VAE in fp32 (the release decodes in fp32), ``EulerDiscreteScheduler``.
    ``weightless``: the checks from the files' headers and the structure alone (no weights read)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from ..models.resampler_xl import ResamplerXL

    require_file(path, DETOKENIZER_FILES)
    for sub, cfg_name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        require_file(os.path.join(sdxl_dir, sub, cfg_name), ("sdxl_base",))
    info = inspect_checkpoint(path) if weightless else None  # None for a legacy pickle: then it is read
    # before the 2.6 B-parameter UNet is read
    check_release_detokenizer(path, sdxl_dir, resampler_config, state=None if info is None else meta_state(info))
    dtype = dtype or torch.float32
    if weightless:
        return (without_weights(lambda: ResamplerXL(**resampler_config), dtype).eval(),
                from_folder(UNet2DConditionModel, os.path.join(sdxl_dir, "unet"), dtype, weightless=True).eval(),
                from_folder(AutoencoderKL, os.path.join(sdxl_dir, "vae"), torch.float32, weightless=True).eval(),
                EulerDiscreteScheduler.from_pretrained(sdxl_dir, subfolder="scheduler"))
    unet = _diffusers_local(UNet2DConditionModel, sdxl_dir, "unet", dtype)
    with empty_init():
        resampler = ResamplerXL(**resampler_config)
    resampler.to(dtype)
    load_release_detokenizer_weights(path, resampler, unet)
    vae = _diffusers_local(AutoencoderKL, sdxl_dir, "vae", torch.float32)
    scheduler = EulerDiscreteScheduler.from_pretrained(sdxl_dir, subfolder="scheduler")
    return resampler.eval(), unet.eval(), vae.eval(), scheduler


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def diffusers_weight_files(folder: str) -> tuple[list[str], list[str]]:
    """``(present, missing)`` weight files of a diffusers component folder (``unet/``, ``vae/``): the first
    of the single-file names that exists, or the shards an index lists. ``([], [])`` when there are none."""
    for name in DIFFUSERS_WEIGHTS:
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a weight index ({e})") from e
            return [f for f in files if os.path.isfile(f)], [f for f in files if not os.path.isfile(f)]
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)], []
    return [], []


def sdxl_component_shapes(sdxl_dir: str, component: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the SDXL base ``unet`` or ``vae`` its ``config.json`` describes (built on the meta
    device: no weights are read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
    path = os.path.join(sdxl_dir, component, "config.json")
    require_file(path, ("sdxl_base",))
    cfg = read_json(path, f"{cls.__name__} config")
    return dict(diffusers_shapes(component, json.dumps(cfg, sort_keys=True), path))


@functools.lru_cache(maxsize=8)
def diffusers_shapes(component: str, config_json: str, path: str) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
    try:
        with torch.device("meta"):
            return tuple(module_shapes(cls.from_config(json.loads(config_json))).items())
    except Exception as e:
        raise CheckpointError(f"{path}: not a usable {cls.__name__} config ({type(e).__name__}: {e})") from e


def check_release_detokenizer(path: str, sdxl_dir: str, resampler_config: Mapping,
                              state: Optional[Mapping] = None) -> dict:
    """Every check ``load_release_detokenizer`` makes, from shapes alone (``state``: tensors, meta tensors or
    shapes; default: read the file). UNet keys the file lacks must be in the SDXL base UNet weights (checked
    from their headers). Returns ``{"resampler": shapes, "unet": shapes, "from_base": [unet keys]}``."""
    from ..models.resampler_xl import ResamplerXL

    require_file(path, DETOKENIZER_FILES)
    unet_shapes = sdxl_component_shapes(sdxl_dir, "unet")
    with torch.device("meta"):
        res_shapes = module_shapes(ResamplerXL(**dict(resampler_config)))
    state = read_state_dict(path) if state is None else state
    res, un = split_detokenizer_state(path, state)
    check_state_dict(path, res, res_shapes, what="the de-tokenizer resampler (resampler.*)")
    from_base = check_state_dict(path, un, unet_shapes, what="the SDXL UNet (unet.*)",
                                 base="the SDXL base UNet (stable-diffusion-xl-base-1.0/unet)")
    if from_base:
        folder = os.path.join(sdxl_dir, "unet")
        present, missing = diffusers_weight_files(folder)
        if missing or not present:
            what = f"shards {first_few(missing)} are missing" if missing else "has no diffusion_pytorch_model weights"
            raise CheckpointError(f"{folder}: {what}, and {path} lacks {len(from_base)} UNet weight(s) that must "
                                  f"come from there ({RELEASE_FILES['sdxl_base'].source})")
        base = {}
        for f in present:
            info = inspect_checkpoint(f)
            if info is not None:
                base.update({k: m.shape for k, m in info.items()})
        if base:
            lacking = [k for k in from_base if k not in base]
            if lacking:
                raise CheckpointError(f"{path} lacks {len(lacking)} UNet weight(s) that the SDXL base UNet in "
                                      f"{folder} does not have either: {first_few(lacking)}")
            bad = [(k, base[k], unet_shapes[k]) for k in from_base if tuple(base[k]) != tuple(unet_shapes[k])]
            if bad:
                raise shape_mismatch_error(folder, bad, "the SDXL UNet its config.json describes")
    return {"resampler": res_shapes, "unet": unet_shapes, "from_base": from_base}


def detokenizer_release_names(resampler_shapes: Mapping, unet_shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """Release names of our de-tokenizer modules: ``resampler.<key>`` and ``unet.<key>``."""
    out = {"resampler." + k: shape_of(v) for k, v in resampler_shapes.items()}
    out.update({"unet." + k: shape_of(v) for k, v in unet_shapes.items()})
    return out


__all__ = [
    "DIFFUSERS_WEIGHTS", "check_release_detokenizer", "detokenizer_release_names", "diffusers_shapes",
    "diffusers_weight_files", "load_release_detokenizer", "load_release_detokenizer_weights",
    "sdxl_component_shapes",
]
