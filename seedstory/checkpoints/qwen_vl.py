"""``python -m seedstory extract-vit``: the visual tokenizer from a Qwen-VL-Chat download.

SEED-Story's ``visual_tokenizer/qwen_vit_G.pt`` is Qwen-VL-Chat's ``transformer.visual`` state dict (docs/formats.md
§4). ``extract_qwen_vit`` reads a local Qwen/Qwen-VL-Chat folder (``.safetensors`` or ``.bin`` shards, with or
without an index file), keeps the ``transformer.visual.*`` tensors with the prefix stripped, checks them against
``QwenVisionTransformer``'s keys and shapes, and writes ``qwen_vit_G.safetensors`` (and, on request,
``qwen_vit_G.pt``). It streams: with an index only the shards holding visual tensors are opened, one at a time,
and of each only the visual tensors are read (safetensors headers / memory-mapped zip pickles), so the 9.6 B
parameter model is never in memory; only the 1.9 B-parameter ViT is. Nothing is written until every check passed.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Optional, Union

import torch

from ..atomic import write_path
from .files import CheckpointError, TensorMeta, inspect_checkpoint, read_json, read_state_dict
from .release_vit import vit_shapes
from .validation import check_state_dict, first_few

VISUAL_PREFIX = "transformer.visual."
OUT_NAME = "qwen_vit_G"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_NUMBER = re.compile(r"-(\d+)-of-(\d+)\.(safetensors|bin)$")
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")

Progress = Callable[[int, int, str], None]  # (shard index from 1, shard count, shard file name)


def _wrong_folder(src: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{src}: {why}. --qwen-vl-chat must be the folder of a Hugging Face Qwen/Qwen-VL-Chat download "
        "(config.json, model shards *.safetensors or pytorch_model-*.bin, usually with an index .json)"
    )


def find_visual_shards(src: str) -> tuple[list[str], Optional[dict[str, str]], list[str]]:
    """``(shards to open, index weight_map or None, missing shard names)``. With an index, only the shards that
    hold ``transformer.visual.*`` keys are returned (a missing one raises; other missing shards do not matter);
    without one, every weight shard present, and the gaps in their ``-0000k-of-0000n`` numbering (which matter
    only if the visual tensors turn out incomplete)."""
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: not found (--qwen-vl-chat must be the folder of a Qwen-VL-Chat download)")
    if not os.path.isdir(src):
        raise _wrong_folder(src, "is a file, not a folder")
    for name in INDEXES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            weight_map = read_json(path, "weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{path}: not a weight index (no weight_map)")
            visual = {k: v for k, v in weight_map.items() if k.startswith(VISUAL_PREFIX)}
            if not visual:
                raise _no_visual(src, weight_map.keys())
            shards = sorted({os.path.join(src, f) for f in visual.values()})
            gone = [f for f in shards if not os.path.isfile(f)]
            if gone:
                counts = {f: sum(os.path.join(src, v) == f for v in visual.values()) for f in gone}
                desc = ", ".join(f"{os.path.basename(f)} ({n} visual tensors)" for f, n in counts.items())
                raise CheckpointError(f"{src}: shard(s) missing: {desc}; {name} lists them. Download them again "
                                      "(Hugging Face Qwen/Qwen-VL-Chat).")
            return shards, weight_map, []
    files = sorted(os.listdir(src))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.endswith((".bin", ".pt", ".pth")) and f not in _NOT_WEIGHTS]
    chosen = st or bins
    if not chosen:
        raise _wrong_folder(src, "holds no *.safetensors or *.bin weight files")
    numbered = [(f, m) for f, m in ((f, _SHARD_NUMBER.search(f)) for f in chosen) if m]
    if numbered:
        first, m0 = numbered[0]
        total, width = int(m0.group(2)), len(m0.group(1))
        have = {int(m.group(1)) for _, m in numbered if int(m.group(2)) == total}
        gone = sorted(set(range(1, total + 1)) - have)
        missing = [f"{first[: m0.start()]}-{i:0{width}d}-of-{m0.group(2)}.{m0.group(3)}" for i in gone]
    else:
        missing = []
    return [os.path.join(src, f) for f in chosen], None, missing


def _no_visual(src: str, keys) -> CheckpointError:
    keys = list(keys)
    hint = ""
    if any(k.startswith("visual.") or ".visual." in k for k in keys):
        hint = " It has visual.* tensors of another layout: Qwen2-VL and later are not SEED-Story's ViT."
    elif any(k.startswith(("transformer.h.", "transformer.wte")) for k in keys):
        hint = " It looks like a Qwen language model without the vision tower (Qwen-7B rather than Qwen-VL-Chat)."
    return _wrong_folder(src, f"no {VISUAL_PREFIX}* tensors among its {len(keys)} weights.{hint}")


def _header(path: str) -> dict[str, TensorMeta]:
    info = inspect_checkpoint(path)
    if info is None:  # legacy pickle: this one shard has to be read whole
        info = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in read_state_dict(path).items()}
    return info


def _outputs(out: str, write_pt: bool) -> list[str]:
    low = out.lower()
    if low.endswith(".safetensors"):
        return [out] + ([os.path.splitext(out)[0] + ".pt"] if write_pt else [])
    if low.endswith((".pt", ".pth", ".bin")):
        return [out]
    return [os.path.join(out, OUT_NAME + ".safetensors")] + ([os.path.join(out, OUT_NAME + ".pt")] if write_pt else [])


def extract_qwen_vit(
    src: str,
    out: str,
    vit_config: Optional[Mapping] = None,
    force: bool = False,
    write_pt: bool = False,
    dtype: Optional[torch.dtype] = None,
    progress: Union[bool, Progress, None] = None,
) -> list[str]:
    """Extract Qwen-VL-Chat's ViT from the download folder ``src`` into ``out`` and return the files written.

    ``out``: a folder (``<out>/qwen_vit_G.safetensors``, plus ``<out>/qwen_vit_G.pt`` with ``write_pt``) or a
    file name ending in ``.safetensors`` or ``.pt``. ``vit_config``: ``QwenVisionTransformer`` kwargs the
    tensors are checked against (default: the release's ViT-bigG). ``dtype``: cast (default: as stored,
    bf16 in Qwen-VL-Chat). ``progress``: True for a tqdm bar on stderr, or ``fn(i, n, shard_name)`` called
    before each shard is read. Existing outputs are refused unless ``force``."""
    targets = _outputs(out, write_pt)
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not force:
        raise CheckpointError(f"{first_few(existing)} already exists; pass --force (force=True) to overwrite")
    shards, weight_map, missing_shards = find_visual_shards(src)

    # 1. Which visual tensor is where, with its shape: headers only.
    where: dict[str, str] = {}
    shapes: dict[str, TensorMeta] = {}
    for shard in shards:
        info = _header(shard)
        for k, m in info.items():
            if k.startswith(VISUAL_PREFIX):
                name = k[len(VISUAL_PREFIX):]
                if name in where:
                    raise CheckpointError(f"{src}: {k} is in both {where[name]} and {shard}")
                where[name], shapes[name] = shard, m
        if weight_map is not None:
            listed = [k for k, f in weight_map.items() if k.startswith(VISUAL_PREFIX) and os.path.join(src, f) == shard]
            absent = [k for k in listed if k not in info]
            if absent:
                raise CheckpointError(f"{shard}: lacks {len(absent)} tensor(s) its index assigns to it: "
                                      f"{first_few(absent)}; download it again")
    if not where and not missing_shards:
        raise _no_visual(src, [k for s in shards for k in _header(s)])

    # 2. Keys and shapes against the visual tokenizer, before anything is read or written.
    expected = vit_shapes(vit_config)
    lacking = [k for k in expected if k not in shapes]
    if lacking and missing_shards:
        raise CheckpointError(f"{src}: {len(missing_shards)} shard(s) missing: {first_few(missing_shards)}, and "
                              f"{len(lacking)} of the {len(expected)} visual tensors are not in the others (e.g. "
                              f"{VISUAL_PREFIX}{lacking[0]}). Download the missing shards again (Hugging Face "
                              "Qwen/Qwen-VL-Chat).")
    try:
        check_state_dict(src, {k: m.shape for k, m in shapes.items()}, expected,
                         what="the visual tokenizer (QwenVisionTransformer, docs/formats.md §4)")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (checked the {VISUAL_PREFIX}* tensors against the preset's visual_tokenizer "
                              "sizes; the release's are Qwen-VL-Chat's ViT-bigG)") from None

    # 3. Read the visual tensors shard by shard.
    todo = sorted({where[k] for k in where})
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="extract-vit", unit="shard")
    state: dict[str, torch.Tensor] = {}
    try:
        for i, shard in enumerate(todo, 1):
            if callable(progress):
                progress(i, len(todo), os.path.basename(shard))
            if bar is not None:
                bar.set_postfix_str(os.path.basename(shard))
            names = [k for k in where if where[k] == shard]
            tensors = read_state_dict(shard)  # safetensors: lazy; zip .bin: memory-mapped
            for k in names:
                t = tensors[VISUAL_PREFIX + k]
                state[k] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
            del tensors
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    # 4. Write.
    os.makedirs(os.path.dirname(os.path.abspath(targets[0])), exist_ok=True)
    written = []
    for target in targets:
        if target.lower().endswith(".safetensors"):
            from safetensors.torch import save_file

            meta = {"format": "pt", "source": f"Qwen-VL-Chat {VISUAL_PREFIX}*", "written_by": "seedstory extract-vit"}
            write_path(target, lambda p: save_file(state, p, metadata=meta))
        else:
            write_path(target, lambda p: torch.save(state, p))
        written.append(target)
    return written


__all__ = ["VISUAL_PREFIX", "extract_qwen_vit", "find_visual_shards"]
