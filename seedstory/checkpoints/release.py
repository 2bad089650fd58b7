"""The released SEED-Story weights: where each file goes, and how it loads into our modules.

This module is the one place that knows the release file formats (docs/formats.md §1-§5). Everything is
read from local files; nothing is downloaded. Files live under ``./pretrained`` (see ``RELEASE_FILES``):

- ``visual_tokenizer/qwen_vit_G.pt``: a plain state dict of Qwen-VL-Chat's ``transformer.visual``; names
  are identical to ``QwenVisionTransformer``'s. ``load_release_visual_tokenizer(path, vit_kwargs)``.
- ``seed_story/george_sft/pytorch_model.bin`` and ``seedx/checkpoint-30000/pytorch_model.bin``: the agent,
  saved with peft 0.4.0 names (``llm.base_model.model.*`` with LoRA A/B, ``modules_to_save`` norms) plus
  ``input_resampler.*``/``output_resampler.*``. ``load_release_agent(path, "pretrained/Llama-2-7b-hf",
  agent_cfg)`` builds a plain ``LlamaForCausalLM`` with the LoRA merged in.
- ``detokenizer_pretrained/...`` and ``detokenizer/detokenizer_george_adapted/...``: ``resampler.*``
  (our ``ResamplerXL``) and ``unet.*`` (diffusers SDXL UNet names), applied on top of the SDXL base UNet.
  ``load_release_detokenizer(path, "pretrained/stable-diffusion-xl-base-1.0", resampler_kwargs)``.
- ``cvlm_llama2_tokenizer/``: SentencePiece Llama tokenizer + 66 added tokens. ``load_release_tokenizer(dir)``.

``.bin``/``.pt`` files are only ever opened with ``torch.load(weights_only=True)``. A loaded module never
comes out half-initialized: each parameter comes from the release file or from a named base (Llama-2 base
folder, SDXL base UNet, or a deterministic table), otherwise ``CheckpointError`` lists what is missing.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

# -- release layout ----------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """A release file is missing, unreadable, or does not match the module it is loaded into."""


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    path: str  # relative to ./pretrained
    what: str
    source: str  # where a user gets it
    manifest: Optional[str] = None  # packaged key manifest (``release_manifest``)
    is_dir: bool = False

    def describe(self, root: str = "pretrained") -> str:
        kind = "folder" if self.is_dir else "file"
        return f"{self.what}; expected {kind}: {os.path.join(root, self.path)}; get it from {self.source}"


_SEED_STORY = "Hugging Face TencentARC/SEED-Story"
RELEASE_FILES: dict[str, ReleaseFile] = {
    f.name: f
    for f in [
        ReleaseFile("seed_story_george_sft", "seed_story/george_sft/pytorch_model.bin",
                    "SEED-Story-George agent (LoRA-tuned Llama-2-7b + input/output resamplers)",
                    f"{_SEED_STORY} (seed_story/george_sft/pytorch_model.bin)", "agent_seed_story_george_sft"),
        ReleaseFile("seedx_pretrained", "seedx/checkpoint-30000/pytorch_model.bin",
                    "SEED-X-pretrained agent (same layout as SEED-Story-George)",
                    "Hugging Face AILab-CVC/SEED-X-17B (the SEED-Story README also lists it among the "
                    f"{_SEED_STORY} files)", "agent_seedx_pretrained"),
        ReleaseFile("detokenizer_pretrained", "detokenizer_pretrained/checkpoint-55000/pytorch_model.bin",
                    "pre-trained de-tokenizer (XL resampler + SDXL UNet)",
                    f"{_SEED_STORY} (detokenizer_pretrained/checkpoint-55000/pytorch_model.bin)",
                    "detokenizer_pretrained"),
        ReleaseFile("detokenizer_george_adapted",
                    "detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin",
                    "Detokenizer-George (StoryStream-adapted de-tokenizer)",
                    f"{_SEED_STORY} (detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin)",
                    "detokenizer_george_adapted"),
        ReleaseFile("visual_tokenizer", "visual_tokenizer/qwen_vit_G.pt",
                    "visual tokenizer (Qwen-VL-Chat's ViT-bigG with attention pool, plain state dict; "
                    "qwen_vit_G.safetensors in the same folder is accepted too)",
                    "Hugging Face AILab-CVC/SEED-X-17B, or extract it from a Hugging Face Qwen/Qwen-VL-Chat download "
                    "with `python -m seedstory extract-vit --qwen-vl-chat DIR --out pretrained/visual_tokenizer/` "
                    "(what the reference's src/tools/reload_qwen_vit.py does)", "qwen_vit_G"),
        ReleaseFile("tokenizer", "cvlm_llama2_tokenizer",
                    "Llama-2 SentencePiece tokenizer with <img>, </img>, <img_00000>..<img_00063> added",
                    f"{_SEED_STORY} (cvlm_llama2_tokenizer/)", is_dir=True),
        ReleaseFile("llama2_7b", "Llama-2-7b-hf", "Llama-2-7b base weights (HF layout: config.json + weights)",
                    "Hugging Face meta-llama/Llama-2-7b-hf (gated: accept the licence first)", is_dir=True),
        ReleaseFile("sdxl_base", "stable-diffusion-xl-base-1.0",
                    "SDXL base (diffusers layout: unet/, vae/, scheduler/)",
                    "Hugging Face stabilityai/stable-diffusion-xl-base-1.0", is_dir=True),
    ]
}
AGENT_FILES = ("seed_story_george_sft", "seedx_pretrained")
DETOKENIZER_FILES = ("detokenizer_pretrained", "detokenizer_george_adapted")


def release_path(name: str, root: str = "pretrained", check: bool = True) -> str:
    """Path of release file ``name`` under ``root``; with ``check``, a missing file raises CheckpointError."""
    if name not in RELEASE_FILES:
        raise KeyError(f"unknown release file {name!r}; known: {sorted(RELEASE_FILES)}")
    path = os.path.join(root, RELEASE_FILES[name].path)
    if check:
        _require(path, (name,))
    return path


def _require(path: str, candidates: Iterable[str], is_dir: bool = False) -> None:
    """Raise CheckpointError naming ``path``, what it is and where it comes from, unless it exists."""
    exists = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if exists:
        return
    norm = os.path.normpath(path).replace(os.sep, "/")
    infos = [RELEASE_FILES[c] for c in candidates]
    exact = [f for f in infos if norm.endswith(f.path.rstrip("/"))]
    lines = "\n".join("  - " + f.describe() for f in (exact or infos))
    raise CheckpointError(f"{path}: not found. It should be:\n{lines}")


# -- reading files -------------------------------------------------------------------------------------------


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


# -- validation ------------------------------------------------------------------------------------------------


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)


def key_family(key: str) -> str:
    """A key's module path with indices starred: ``unet.down_blocks.1.resnets.0.conv1.weight`` ->
    ``unet.down_blocks.*.resnets.*.conv1``."""
    parts = ["*" if p.isdigit() else p for p in key.split(".")]
    return ".".join(parts[:-1]) if len(parts) > 1 else key


def _first(items: list, n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def _unknown_error(file: str, keys: list[str], what: str) -> CheckpointError:
    fams = sorted({key_family(k) for k in keys})
    return CheckpointError(
        f"{file}: {len(keys)} key(s) do not belong to {what} (unknown key families: {_first(fams)}); "
        f"first keys: {_first(sorted(keys))}. Is this the right file for this component?"
    )


def _shape_error(file: str, bad: list[tuple[str, tuple, tuple]], what: str) -> CheckpointError:
    desc = _first([f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in bad], 4)
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
        raise _unknown_error(file, unknown, what)
    bad = [(k, _shape(v), tuple(expected[k])) for k, v in state.items() if _shape(v) != tuple(expected[k])]
    if bad:
        raise _shape_error(file, bad, what)
    missing = [k for k in expected if k not in state]
    if missing and base is None:
        hard = [k for k in missing if k not in set(defaults)]
        if hard:
            raise CheckpointError(
                f"{file}: {len(hard)} parameter(s) of {what} are missing from the file and have no base to come "
                f"from: {_first(hard)}"
            )
    return missing


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _empty_init():
    """Context manager: parameters are created on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> None:
    """Load ``state`` into ``module``: complete state into a meta-initialized module (by assignment, cast to
    ``dtype`` or the module's dtypes), otherwise copied into the existing parameters (a subset is fine: the
    caller has checked where the rest comes from)."""
    own = module.state_dict()
    if any(t.is_meta for t in own.values()):
        cast = {k: v.to(dtype=dtype or own[k].dtype, copy=True) for k, v in state.items()}
        module.load_state_dict(cast, strict=True, assign=True)
    else:
        module.load_state_dict(dict(state), strict=False)


# -- packaged manifests ------------------------------------------------------------------------------------

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


# -- agent: naming -----------------------------------------------------------------------------------------

LLM_PREFIX = "llm.base_model.model."
RESAMPLER_PREFIXES = ("input_resampler.", "output_resampler.")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("input_layernorm", "post_attention_layernorm", "norm")
_PEFT_MARKERS = (
    (".lora_A.default.", "lora_A"),
    (".lora_B.default.", "lora_B"),
    (".modules_to_save.default.", "saved"),
    (".original_module.", "original"),
    (".base_layer.", "plain"),  # newer peft naming of the frozen base weight; accepted as well
)


def is_peft_extra(key: str) -> bool:
    """Release agent keys with no counterpart in a plain (merged) Llama: LoRA factors, peft's copy of the
    original norms, and the saved RoPE ``inv_freq`` buffers."""
    return ".lora_" in key or ".original_module." in key or key.endswith("rotary_emb.inv_freq")


def agent_release_names(shapes: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    """Map a (LoRA-less) ``SeedStoryAgent`` state dict ``{key: shape}`` to release names: ``llm.X`` ->
    ``llm.base_model.model.X``, the norms -> ``...<norm>.modules_to_save.default.weight``; resampler keys
    are unchanged. The result equals the release manifest minus ``is_peft_extra`` keys."""
    out = {}
    for k, v in shapes.items():
        if k.startswith("llm."):
            k = k[len("llm."):]
            mod, param = k.rsplit(".", 1)
            if mod.rsplit(".", 1)[-1] in MODULES_TO_SAVE:
                k = f"{mod}.modules_to_save.default.{param}"
            k = LLM_PREFIX + k
        out[k] = _shape(v)
    return out


def _parse_agent_key(key: str) -> tuple[str, str]:
    """-> (kind, target). kind: plain / saved / original / lora_A / lora_B (target: a Llama state-dict key),
    input_resampler / output_resampler (target: resampler key), ignored, unknown."""
    for p in RESAMPLER_PREFIXES:
        if key.startswith(p):
            return p[:-1], key[len(p):]
    if not key.startswith(LLM_PREFIX):
        return "unknown", key
    k = key[len(LLM_PREFIX):]
    if k.endswith("rotary_emb.inv_freq"):
        return "ignored", k  # RoPE is recomputed exactly (docs/formats.md §2)
    for marker, kind in _PEFT_MARKERS:
        if marker in k:
            mod, param = k.split(marker, 1)
            if kind.startswith("lora"):
                return (kind, mod + ".weight") if param == "weight" else ("unknown", key)
            return kind, f"{mod}.{param}"
    return "plain", k


# -- agent: Llama base folder -----------------------------------------------------------------------------


class _LlamaBase:
    """A Llama base folder in HF layout: ``config.json`` plus ``model.safetensors`` / ``pytorch_model.bin``,
    sharded with an index or not. Key lists and shapes come from headers; weights are read per key, only when
    needed."""

    def __init__(self, path: str):
        _require(os.path.join(path, "config.json"), ("llama2_7b",))
        self.path = path
        self.key_file: dict[str, str] = {}
        self._files: dict[str, Mapping] = {}
        self._headers: dict[str, dict] = {}
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if os.path.isfile(os.path.join(path, index)):
                try:
                    with open(os.path.join(path, index)) as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{os.path.join(path, index)}: not a weight index ({e})") from e
                self.key_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
                break
            if os.path.isfile(os.path.join(path, single)):
                file = os.path.join(path, single)
                self.key_file = {k: file for k in self.header(file)}
                break

    @property
    def missing_files(self) -> list[str]:
        """Shards the index names that are not on disk."""
        return sorted({f for f in self.key_file.values() if not os.path.isfile(f)})

    def config(self):
        from transformers import LlamaConfig

        try:
            return LlamaConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.path}/config.json: not a readable Llama config ({e})") from e

    def header(self, file: str) -> dict:
        if file not in self._headers:
            info = inspect_checkpoint(file)
            if info is None:  # legacy pickle: no header to read
                info = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._open(file).items()}
            self._headers[file] = info
        return self._headers[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header(self.key_file[key])[key].shape

    def _open(self, file: str) -> Mapping:
        if file not in self._files:
            self._files[file] = read_state_dict(file)
        return self._files[file]

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._open(self.key_file[key])[key]

    def where(self) -> str:
        return (f"the Llama base folder {self.path}" if self.key_file
                else f"the Llama base folder {self.path} (which has no model*.safetensors / pytorch_model*.bin)")


# -- agent: loading ------------------------------------------------------------------------------------------


@dataclass
class AgentPlan:
    """What ``check_release_agent`` found: everything needed to build the agent, all checked, nothing merged."""

    path: str
    llm_config: object  # transformers LlamaConfig
    expected: dict  # Llama state-dict key -> shape
    parts: dict  # kind -> {target key: tensor (or meta tensor)}
    base: _LlamaBase
    from_base: list  # Llama keys the file lacks, taken from the base folder
    input_resampler: object  # meta-initialized QwenResampler
    output_resampler: object
    resampler_missing: dict  # name -> keys absent from the file (pos_embed: deterministic)
    lora_alpha: float
    lora_r: Optional[int]
    scales: dict

    @property
    def llm_parameters(self) -> int:
        return sum(_numel(s) for s in self.expected.values())

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder's Linear layers (what 8-/4-bit quantization shrinks)."""
        return sum(_numel(s) for k, s in self.expected.items()
                   if ".layers." in k and len(s) == 2 and k.endswith("_proj.weight"))

    @property
    def resampler_parameters(self) -> int:
        return sum(p.numel() for m in (self.input_resampler, self.output_resampler) for p in m.parameters())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _agent_config(config: Mapping) -> dict:
    cfg = dict(config)
    for name in ("input_resampler", "output_resampler"):
        if name not in cfg:
            raise CheckpointError(f"agent config needs {name!r} (QwenResampler kwargs)")
    return cfg


def check_release_agent(
    agent_path: str,
    llm_base_dir: str,
    config: dict,
    vocab_size: Optional[int] = None,
    state: Optional[Mapping[str, torch.Tensor]] = None,
) -> AgentPlan:
    """Every check ``load_release_agent`` makes, without merging (``state``: the file's tensors, or meta
    tensors from ``meta_state(inspect_checkpoint(path))`` to check a file from its header alone). Raises
    CheckpointError; returns an ``AgentPlan``."""
    from transformers import LlamaForCausalLM

    from ..models.qwen_resampler import QwenResampler

    _require(agent_path, AGENT_FILES)
    cfg = _agent_config(config)
    if state is None:
        state = read_state_dict(agent_path)
    base = _LlamaBase(llm_base_dir)

    # Architecture: the base config, vocabulary from the file (or vocab_size), untied head (both trained).
    emb_key = LLM_PREFIX + "model.embed_tokens.weight"
    file_vocab = state[emb_key].shape[0] if emb_key in state else None
    if vocab_size is not None and file_vocab is not None and vocab_size != file_vocab:
        raise CheckpointError(f"{agent_path}: embed_tokens has {file_vocab} rows but vocab_size={vocab_size} "
                              "(the tokenizer's length): is the tokenizer the one this agent was trained with?")
    llm_config = base.config()
    for k, v in dict(cfg.get("llm") or {}).items():
        setattr(llm_config, k, v)
    llm_config.vocab_size = vocab_size or file_vocab or llm_config.vocab_size
    llm_config.tie_word_embeddings = False
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_config)
        inp = QwenResampler(**cfg["input_resampler"])
        out = QwenResampler(**cfg["output_resampler"])
    expected = _shapes(llm)
    del llm

    # Sort the file's keys.
    parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in
                                                 ("plain", "saved", "lora_A", "lora_B", "input_resampler",
                                                  "output_resampler")}
    unknown = []
    for key in state:
        kind, target = _parse_agent_key(key)
        if kind in ("plain", "saved", "original", "lora_A", "lora_B") and target not in expected:
            kind = "unknown"
        if kind == "unknown":
            unknown.append(key)
        if kind in ("unknown", "ignored", "original"):  # original_module: peft's dead copy of the norm
            continue
        if target in parts[kind]:
            raise CheckpointError(f"{agent_path}: two keys map to {kind} {target} (e.g. {key})")
        parts[kind][target] = state[key]
    if unknown:
        raise _unknown_error(agent_path, unknown, "a SEED-Story agent (peft 0.4.0 Llama + resamplers)")

    # Shapes, LoRA pairs, conflicts.
    bad = [(LLM_PREFIX + k, tuple(v.shape), expected[k]) for kind in ("plain", "saved")
           for k, v in parts[kind].items() if tuple(v.shape) != expected[k]]
    both = sorted(set(parts["plain"]) & set(parts["saved"]))
    if both:
        raise CheckpointError(f"{agent_path}: both a plain weight and a modules_to_save copy for {_first(both)}")
    lora_r = cfg.get("lora_r")
    alpha = float(cfg.get("lora_alpha", 32))
    if set(parts["lora_A"]) != set(parts["lora_B"]):
        odd = sorted(set(parts["lora_A"]) ^ set(parts["lora_B"]))
        raise CheckpointError(f"{agent_path}: LoRA A without B (or B without A) for {_first(odd)}")
    for k, a in parts["lora_A"].items():
        b, (n_out, n_in) = parts["lora_B"][k], expected[k]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, n_in) or tuple(b.shape) != (n_out, r):
            bad.append((f"{LLM_PREFIX}{k[:-7]}.lora_A/B", (tuple(a.shape), tuple(b.shape)), ((r, n_in), (n_out, r))))
        elif lora_r is not None and r != int(lora_r):
            raise CheckpointError(f"{agent_path}: LoRA rank {r} for {k}, but the config says lora_r={lora_r}")
    if bad:
        raise _shape_error(agent_path, bad, "the agent's language model")

    # Everything the file lacks must come from the base folder, with the right shapes.
    need = [k for k in expected if k not in parts["plain"] and k not in parts["saved"]]
    lacking = [k for k in need if k not in base]
    if lacking:
        raise CheckpointError(
            f"{agent_path} lacks {len(lacking)} parameter(s) of the language model that are not in "
            f"{base.where()} either: {_first(lacking)}. Put the Llama-2-7b-hf weights there "
            f"({RELEASE_FILES['llama2_7b'].source})."
        )
    gone = sorted({base.key_file[k] for k in need if not os.path.isfile(base.key_file[k])})
    if gone:
        raise CheckpointError(
            f"{llm_base_dir}: {len(gone)} weight shard(s) listed in its index are missing: {_first(gone)} "
            f"({agent_path} does not hold those weights). Download them again "
            f"({RELEASE_FILES['llama2_7b'].source})."
        )
    for k in need:
        if base.shape(k) != expected[k]:
            raise CheckpointError(
                f"{llm_base_dir}: {k} has shape {list(base.shape(k))} but the agent needs {list(expected[k])}, "
                f"and {agent_path} does not provide it"
            )

    missing_res = {}
    for name, module in (("input_resampler", inp), ("output_resampler", out)):
        missing_res[name] = check_state_dict(agent_path, parts[name], _shapes(module),
                                             what=f"the agent's {name}", defaults=("pos_embed",))
    scales = {k: float(cfg[k]) for k in ("lm_loss_scale", "rec_loss_scale") if k in cfg}
    return AgentPlan(agent_path, llm_config, expected, parts, base, need, inp, out, missing_res, alpha,
                     None if lora_r is None else int(lora_r), scales)


def load_release_agent(
    agent_path: str,
    llm_base_dir: str,
    config: dict,
    dtype: Optional[torch.dtype] = None,
    vocab_size: Optional[int] = None,
):
    """Load a released agent (``seed_story/george_sft`` or ``seedx/checkpoint-30000``) into a
    ``SeedStoryAgent`` whose ``llm`` is a plain ``LlamaForCausalLM`` with the LoRA merged.

    ``llm_base_dir``: Llama-2-7b-hf (HF layout); its ``config.json`` defines the architecture and its weights
    fill whatever the file lacks (a trainable-only file has no frozen base linears). The vocabulary is resized
    to the file's ``embed_tokens`` rows (or ``vocab_size``); rows beyond the base come from the file.
    ``config``: ``input_resampler`` and ``output_resampler`` (QwenResampler kwargs), optional ``llm``
    (LlamaConfig overrides), ``lora_alpha`` (32), ``lora_r`` (checked against the file; read from the
    ``lora_A`` shapes), ``lm_loss_scale``/``rec_loss_scale``.
    Per linear ``W + (lora_alpha / r) * B @ A`` is computed in fp32, then cast to ``dtype`` (default fp32);
    norms use ``modules_to_save.default``; ``original_module`` and ``rotary_emb.inv_freq`` are ignored; base
    weights found in the file override the base folder. A missing ``*_resampler.pos_embed`` (frozen, so
    absent from trainable-only files) is the deterministic 2D sin-cos table. All checks
    (``check_release_agent``) pass before anything is merged."""
    from transformers import LlamaForCausalLM

    from ..models.agent import SeedStoryAgent
    from ..models.qwen_resampler import QwenResampler, sincos_2d

    plan = check_release_agent(agent_path, llm_base_dir, config, vocab_size)
    dtype = dtype or torch.float32
    cfg = _agent_config(config)
    parts, base = plan.parts, plan.base
    with _empty_init():
        llm = LlamaForCausalLM(plan.llm_config)
        inp = QwenResampler(**cfg["input_resampler"])
        out = QwenResampler(**cfg["output_resampler"])

    merged = {}
    for k in plan.expected:
        if k in parts["saved"]:
            w = parts["saved"][k]
        elif k in parts["plain"]:
            w = parts["plain"][k]
        else:
            w = base[k]
        if k in parts["lora_A"]:
            a, b = parts["lora_A"][k], parts["lora_B"][k]
            delta = (plan.lora_alpha / a.shape[0]) * (b.float() @ a.float())
            w = (w.float() + delta).to(dtype)
        else:
            w = w.to(dtype=dtype, copy=True)
        merged[k] = w
    llm.load_state_dict(merged, strict=True, assign=True)
    del merged

    for name, module in (("input_resampler", inp), ("output_resampler", out)):
        sub = dict(parts[name])
        if "pos_embed" in plan.resampler_missing[name]:
            sub["pos_embed"] = sincos_2d(module.embed_dim, int(round(module.num_queries**0.5)))
        _assign(module, sub, dtype)

    return SeedStoryAgent(llm, inp, out, **plan.scales).eval()


# -- visual tokenizer --------------------------------------------------------------------------------------


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


def _vit_shapes(config: Optional[Mapping]) -> dict[str, tuple[int, ...]]:
    return dict(_vit_shapes_cached(json.dumps(dict(config or {}), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _vit_shapes_cached(config_json: str) -> tuple:
    from ..models.qwen_vit import QwenVisionTransformer

    with torch.device("meta"):
        return tuple(_shapes(QwenVisionTransformer(**json.loads(config_json))).items())


def check_release_visual_tokenizer(path: str, config: Optional[Mapping] = None,
                                   state: Optional[Mapping] = None) -> dict[str, tuple[int, ...]]:
    """Check a visual tokenizer file (or ``state``: tensors, meta tensors or shapes) against
    ``QwenVisionTransformer(**config)``; returns the expected ``{key: shape}``."""
    path = resolve_visual_tokenizer_path(path)
    _require(path, ("visual_tokenizer",))
    expected = _vit_shapes(config)
    check_state_dict(path, read_state_dict(path) if state is None else state, expected,
                     what="the visual tokenizer (QwenVisionTransformer)")
    return expected


def load_release_visual_tokenizer(path: str, config: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    """``visual_tokenizer/qwen_vit_G.pt`` (or ``qwen_vit_G.safetensors``, see ``resolve_visual_tokenizer_path``)
    -> ``QwenVisionTransformer(**config)`` (release defaults when ``config`` is None). The file is a plain state
    dict with our names; all 594 keys are required."""
    from ..models.qwen_vit import QwenVisionTransformer

    path = resolve_visual_tokenizer_path(path)
    _require(path, ("visual_tokenizer",))
    state = read_state_dict(path)
    with _empty_init():
        vit = QwenVisionTransformer(**(config or {}))
    check_state_dict(path, state, _shapes(vit), what="the visual tokenizer (QwenVisionTransformer)")
    _assign(vit, state, dtype or torch.float32)
    return vit.eval()


# -- de-tokenizer -------------------------------------------------------------------------------------------


def load_release_detokenizer_weights(path: str, resampler, unet) -> tuple:
    """Apply a released de-tokenizer file: ``resampler.*`` -> ``resampler`` (a ``ResamplerXL``; every key
    required) and ``unet.*`` -> ``unet`` (an SDXL ``UNet2DConditionModel`` already holding the SDXL base
    weights; full files override all of them, trainable-only files just the 280 attn to_k/to_v weights).
    Returns ``(resampler, unet)``."""
    _require(path, DETOKENIZER_FILES)
    state = read_state_dict(path)
    res, un, other = {}, {}, []
    for k in state:
        if k.startswith("resampler."):
            res[k[len("resampler."):]] = state[k]
        elif k.startswith("unet."):
            un[k[len("unet."):]] = state[k]
        else:
            other.append(k)
    if other:
        raise _unknown_error(path, other, "a SEED-Story de-tokenizer (resampler.* and unet.*)")
    check_state_dict(path, res, _shapes(resampler), what="the de-tokenizer resampler (resampler.*)")
    check_state_dict(path, un, _shapes(unet), what="the SDXL UNet (unet.*)",
                     base="the SDXL base UNet (stable-diffusion-xl-base-1.0/unet)")
    if any(p.is_meta for p in unet.parameters()):
        raise CheckpointError("load the SDXL base UNet before applying a de-tokenizer file to it")
    _assign(resampler, res, None)
    _assign(unet, un, None)
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


def load_release_detokenizer(path: str, sdxl_dir: str, resampler_config: dict, dtype: Optional[torch.dtype] = None):
    """A released de-tokenizer file on top of the SDXL base folder (diffusers layout). Returns
    ``(resampler, unet, vae, scheduler)``: ``ResamplerXL(**resampler_config)`` and the UNet in ``dtype``
    (default fp32), the SDXL VAE in fp32 (the release decodes in fp32), ``EulerDiscreteScheduler``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from ..models.resampler_xl import ResamplerXL

    _require(path, DETOKENIZER_FILES)
    for sub, cfg_name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        _require(os.path.join(sdxl_dir, sub, cfg_name), ("sdxl_base",))
    check_release_detokenizer(path, sdxl_dir, resampler_config)  # before the 2.6 B-parameter UNet is read
    dtype = dtype or torch.float32
    unet = _diffusers_local(UNet2DConditionModel, sdxl_dir, "unet", dtype)
    with _empty_init():
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


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e


def sdxl_component_shapes(sdxl_dir: str, component: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the SDXL base ``unet`` or ``vae`` its ``config.json`` describes (built on the meta
    device: no weights are read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
    path = os.path.join(sdxl_dir, component, "config.json")
    _require(path, ("sdxl_base",))
    cfg = _read_json(path, f"{cls.__name__} config")
    return dict(_diffusers_shapes(component, json.dumps(cfg, sort_keys=True), path))


@functools.lru_cache(maxsize=8)
def _diffusers_shapes(component: str, config_json: str, path: str) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
    try:
        with torch.device("meta"):
            return tuple(_shapes(cls.from_config(json.loads(config_json))).items())
    except Exception as e:
        raise CheckpointError(f"{path}: not a usable {cls.__name__} config ({type(e).__name__}: {e})") from e


def check_release_detokenizer(path: str, sdxl_dir: str, resampler_config: Mapping,
                              state: Optional[Mapping] = None) -> dict:
    """Every check ``load_release_detokenizer`` makes, from shapes alone (``state``: tensors, meta tensors or
    shapes; default: read the file). UNet keys the file lacks must be in the SDXL base UNet weights (checked
    from their headers). Returns ``{"resampler": shapes, "unet": shapes, "from_base": [unet keys]}``."""
    from ..models.resampler_xl import ResamplerXL

    _require(path, DETOKENIZER_FILES)
    unet_shapes = sdxl_component_shapes(sdxl_dir, "unet")
    with torch.device("meta"):
        res_shapes = _shapes(ResamplerXL(**dict(resampler_config)))
    state = read_state_dict(path) if state is None else state
    res, un, other = {}, {}, []
    for k in state:
        if k.startswith("resampler."):
            res[k[len("resampler."):]] = state[k]
        elif k.startswith("unet."):
            un[k[len("unet."):]] = state[k]
        else:
            other.append(k)
    if other:
        raise _unknown_error(path, other, "a SEED-Story de-tokenizer (resampler.* and unet.*)")
    check_state_dict(path, res, res_shapes, what="the de-tokenizer resampler (resampler.*)")
    from_base = check_state_dict(path, un, unet_shapes, what="the SDXL UNet (unet.*)",
                                 base="the SDXL base UNet (stable-diffusion-xl-base-1.0/unet)")
    if from_base:
        folder = os.path.join(sdxl_dir, "unet")
        present, missing = diffusers_weight_files(folder)
        if missing or not present:
            what = f"shards {_first(missing)} are missing" if missing else "has no diffusion_pytorch_model weights"
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
                                      f"{folder} does not have either: {_first(lacking)}")
            bad = [(k, base[k], unet_shapes[k]) for k in from_base if tuple(base[k]) != tuple(unet_shapes[k])]
            if bad:
                raise _shape_error(folder, bad, "the SDXL UNet its config.json describes")
    return {"resampler": res_shapes, "unet": unet_shapes, "from_base": from_base}


def detokenizer_release_names(resampler_shapes: Mapping, unet_shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """Release names of our de-tokenizer modules: ``resampler.<key>`` and ``unet.<key>``."""
    out = {"resampler." + k: _shape(v) for k, v in resampler_shapes.items()}
    out.update({"unet." + k: _shape(v) for k, v in unet_shapes.items()})
    return out


# -- tokenizer ------------------------------------------------------------------------------------------------

SPIECE_UNDERLINE = "\u2581"
# A second NormalizerSpec (ModelProto field 3) holding add_dummy_prefix=false (field 3, varint 0). Protobuf
# merges repeated message fields, so appending it turns the dummy prefix off without the protobuf package.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


@functools.lru_cache(maxsize=None)
def _tokenizer_class():
    """The slow SentencePiece Llama tokenizer of transformers 4.x (what the release used), or, on
    transformers 5 where that class is gone, a SentencePiece-backed equivalent with the same rules."""
    import transformers

    slow = getattr(transformers, "LlamaTokenizer", None)
    if slow is not None and hasattr(slow, "get_spm_processor"):
        return slow

    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class ReleaseLlamaTokenizer(SentencePieceBackend):
        """transformers-4.34 ``LlamaTokenizer`` rules: with ``legacy`` every chunk between added tokens gets
        SentencePiece's dummy prefix (so text right after ``</img>`` starts with "▁"); without it only the
        start of the text does. BOS is prepended, EOS not (``add_bos_token``/``add_eos_token``)."""

        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                     add_bos_token=True, add_eos_token=False, legacy=True, clean_up_tokenization_spaces=False,
                     **kwargs):
            self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
            legacy = True if legacy is None else bool(legacy)
            kwargs.pop("sp_model_kwargs", None)
            super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                             pad_token=pad_token, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                             clean_up_tokenization_spaces=clean_up_tokenization_spaces, legacy=True, **kwargs)
            self.legacy = self.init_kwargs["legacy"] = legacy
            if not legacy:
                with open(vocab_file, "rb") as f:
                    proto = f.read()
                self.sp_model = spm.SentencePieceProcessor()
                self.sp_model.LoadFromSerializedProto(proto + _NO_DUMMY_PREFIX)

        @property
        def unk_token_length(self) -> int:
            return len(self.sp_model.encode(str(self.unk_token)))

        def tokenize(self, text, **kwargs):
            if self.legacy or len(text) == 0:
                return super().tokenize(text, **kwargs)
            tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

        def _tokenize(self, text, **kwargs):
            if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
                return self.sp_model.encode(text, out_type=str)
            tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
            n = self.unk_token_length
            return tokens[n:] if len(tokens) >= n else tokens

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            bos = [self.bos_token_id] if self.add_bos_token else []
            eos = [self.eos_token_id] if self.add_eos_token else []
            out = bos + token_ids_0 + eos
            return out if token_ids_1 is None else out + bos + token_ids_1 + eos

        def convert_tokens_to_string(self, tokens):
            tokens = list(tokens)
            if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
                tokens[0] = tokens[0][1:]
            out, sub, prev_special = "", [], False
            for i, token in enumerate(tokens):
                if token in self.all_special_tokens:
                    if not prev_special and i != 0 and self.legacy:
                        out += " "
                    out += self.sp_model.decode(sub) + token
                    prev_special, sub = True, []
                else:
                    sub.append(token)
                    prev_special = False
            return out + self.sp_model.decode(sub)

    return ReleaseLlamaTokenizer


def load_release_tokenizer(path: str, num_img_tokens: Optional[int] = 64):
    """``cvlm_llama2_tokenizer/`` (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``added_tokens.json``) -> the slow SentencePiece Llama tokenizer, from local files only.

    ``legacy`` comes from ``tokenizer_config.json`` (absent: True, the transformers-4.34 default the release
    ran with). Added-token ids come from the files and are checked after loading; the image tokens
    (``<img>``, ``</img>``, ``<img_00000>``..) must each be one token."""
    from ..tokens import ImageTokenIds, TokenizerError

    _require(path, ("tokenizer",), is_dir=True)
    _require(os.path.join(path, "tokenizer.model"), ("tokenizer",))
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            tok_cfg = json.load(f)
    legacy = tok_cfg.get("legacy")
    legacy = True if legacy is None else bool(legacy)
    try:
        tok = _tokenizer_class().from_pretrained(path, legacy=legacy, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the Llama tokenizer ({type(e).__name__}: {e})") from e

    declared = {}
    added_path = os.path.join(path, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path) as f:
            declared.update(json.load(f))
    for idx, spec in (tok_cfg.get("added_tokens_decoder") or {}).items():
        declared.setdefault(spec["content"] if isinstance(spec, dict) else str(spec), int(idx))
    wrong = [(t, i, tok.convert_tokens_to_ids(t)) for t, i in declared.items() if tok.convert_tokens_to_ids(t) != i]
    if wrong:
        raise CheckpointError(f"{path}: added tokens got other ids than the files give (token, file id, "
                              f"loaded id): {_first(wrong)}")
    if num_img_tokens is None:  # no image-token check
        return tok
    try:
        ImageTokenIds.from_tokenizer(tok, num_img_tokens)
    except TokenizerError as e:
        raise CheckpointError(f"{path}: not a SEED-Story tokenizer: {e}") from e
    return tok


# -- the whole release: paths, one check, one pipeline ---------------------------------------------------

# preset ``release.<key>`` -> the RELEASE_FILES entries it may name (the first is the default).
RELEASE_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer",),
    "llm_base": ("llama2_7b",),
    "agent": AGENT_FILES,
    "visual_tokenizer": ("visual_tokenizer",),
    "sdxl_base": ("sdxl_base",),
    "detokenizer": ("detokenizer_george_adapted", "detokenizer_pretrained"),
}
_DEFAULT_RELEASE = {"root": "pretrained", "tokenizer": "cvlm_llama2_tokenizer", "llm_base": "Llama-2-7b-hf",
                    "agent": RELEASE_FILES["seed_story_george_sft"].path,
                    "visual_tokenizer": RELEASE_FILES["visual_tokenizer"].path,
                    "sdxl_base": "stable-diffusion-xl-base-1.0",
                    "detokenizer": RELEASE_FILES["detokenizer_george_adapted"].path}


def _plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def release_root(cfg) -> str:
    """The preset's ``release.root``: relative paths are relative to the repository root (so ``pretrained``
    is ``<repo>/pretrained`` from any working directory); absolute paths are kept."""
    from ..config import resolve_path

    return resolve_path(str((_plain(cfg).get("release") or {}).get("root", "pretrained")))


def release_entry(key: str, rel: str) -> ReleaseFile:
    """The RELEASE_FILES entry a preset ``release.<key>`` path stands for (matched by its release path)."""
    names = RELEASE_KEYS[key]
    norm = rel.replace(os.sep, "/").rstrip("/")
    for n in names:
        if norm.endswith(RELEASE_FILES[n].path):
            return RELEASE_FILES[n]
    return RELEASE_FILES[names[0]]


def release_paths(cfg) -> dict[str, str]:
    """``{key: absolute path}`` for the preset's ``release`` section (keys of ``RELEASE_KEYS``), joined to
    ``release_root``; the visual tokenizer path goes through ``resolve_visual_tokenizer_path``."""
    rel = {**_DEFAULT_RELEASE, **(_plain(cfg).get("release") or {})}
    root = release_root(cfg)
    out = {k: os.path.join(root, str(rel[k])) for k in RELEASE_KEYS}
    out["visual_tokenizer"] = resolve_visual_tokenizer_path(out["visual_tokenizer"])
    return out


@dataclass(frozen=True)
class Requirement:
    """One file or folder a release preset needs."""

    key: str  # preset release key
    path: str
    entry: ReleaseFile
    is_dir: bool = False
    part: str = ""  # which part of the entry, e.g. "unet weights"

    def exists(self) -> bool:
        if self.part.endswith("weights"):
            present, missing = diffusers_weight_files(os.path.dirname(self.path))
            return bool(present) and not missing
        return os.path.isdir(self.path) if self.is_dir else os.path.isfile(self.path)

    def describe(self) -> str:
        kind = "folder" if self.is_dir else "file"
        what = f"{self.part} of the {self.entry.what}" if self.part else self.entry.what
        return f"{self.path} ({kind}): {what}; get it from {self.entry.source}"


def release_requirements(cfg) -> list[Requirement]:
    """Every file and folder ``load_release_pipeline`` needs, in loading order. Llama base weights are not
    listed: a full agent file carries them (``check_release_agent`` decides when the folder's are needed)."""
    rel = {**_DEFAULT_RELEASE, **(_plain(cfg).get("release") or {})}
    p = release_paths(cfg)
    e = {k: release_entry(k, str(rel[k])) for k in RELEASE_KEYS}
    sd = p["sdxl_base"]
    return [
        Requirement("tokenizer", p["tokenizer"], e["tokenizer"], is_dir=True),
        Requirement("tokenizer", os.path.join(p["tokenizer"], "tokenizer.model"), e["tokenizer"],
                    part="SentencePiece model"),
        Requirement("llm_base", p["llm_base"], e["llm_base"], is_dir=True),
        Requirement("llm_base", os.path.join(p["llm_base"], "config.json"), e["llm_base"], part="config.json"),
        Requirement("agent", p["agent"], e["agent"]),
        Requirement("visual_tokenizer", p["visual_tokenizer"], e["visual_tokenizer"]),
        Requirement("sdxl_base", sd, e["sdxl_base"], is_dir=True),
        Requirement("sdxl_base", os.path.join(sd, "unet", "config.json"), e["sdxl_base"], part="UNet config"),
        Requirement("sdxl_base", os.path.join(sd, "unet", DIFFUSERS_WEIGHTS[0]), e["sdxl_base"],
                    part="UNet weights"),
        Requirement("sdxl_base", os.path.join(sd, "vae", "config.json"), e["sdxl_base"], part="VAE config"),
        Requirement("sdxl_base", os.path.join(sd, "vae", DIFFUSERS_WEIGHTS[0]), e["sdxl_base"], part="VAE weights"),
        Requirement("sdxl_base", os.path.join(sd, "scheduler", "scheduler_config.json"), e["sdxl_base"],
                    part="scheduler config"),
        Requirement("detokenizer", p["detokenizer"], e["detokenizer"]),
    ]


def missing_release_files(cfg) -> list[Requirement]:
    """The requirements that are not on disk (a missing folder stands for everything inside it)."""
    out, gone_dirs = [], []
    for r in release_requirements(cfg):
        if any(r.path.startswith(d + os.sep) for d in gone_dirs):
            continue
        if not r.exists():
            out.append(r)
            if r.is_dir:
                gone_dirs.append(r.path)
    return out


def check_release_files(cfg) -> None:
    """Raise ONE CheckpointError listing every missing file (where it goes, where it comes from)."""
    missing = missing_release_files(cfg)
    if not missing:
        return
    root = release_root(cfg)
    name = _plain(cfg).get("name", "release")
    head = (f"the release folder {root} does not exist" if not os.path.isdir(root)
            else f"{len(missing)} release file(s) missing under {root}")
    lines = "\n".join("  - " + r.describe() for r in missing)
    raise CheckpointError(f"preset {name!r}: {head}:\n{lines}\n"
                          f"(`python -m seedstory doctor --preset {name}` checks the whole folder in seconds)")


def release_agent_config(cfg) -> dict:
    """``load_release_agent``'s config from a preset's ``agent`` section (``lora: {r, alpha}`` ->
    ``lora_r``/``lora_alpha``); checks that the input resampler has ``num_img_tokens`` slots."""
    from ..config import PresetError

    c = _plain(cfg)
    a = dict(c.get("agent") or {})
    for name in ("input_resampler", "output_resampler"):
        if name not in a:
            raise PresetError(f"preset {c.get('name')!r}: agent.{name} is missing")
    out = {"input_resampler": dict(a["input_resampler"]), "output_resampler": dict(a["output_resampler"])}
    lora = dict(a.get("lora") or {})
    if "r" in lora:
        out["lora_r"] = lora["r"]
    if "alpha" in lora:
        out["lora_alpha"] = lora["alpha"]
    for k in ("lm_loss_scale", "rec_loss_scale", "llm"):
        if a.get(k) is not None:
            out[k] = a[k]
    n_img = int(c.get("num_img_tokens", 64))
    grid = int(out["input_resampler"].get("grid_size", 8))
    if grid * grid != n_img:
        raise PresetError(f"preset {c.get('name')!r}: num_img_tokens={n_img} but agent.input_resampler.grid_size="
                          f"{grid} gives {grid * grid} image slots (grid_size must be sqrt(num_img_tokens))")
    return out


def load_release_pipeline(cfg, device=None, dtype: Optional[torch.dtype] = None):
    """A preset with ``source: release`` -> ``SeedStoryPipeline``.

    Paths come from ``cfg.release`` (``release_paths``); every needed file is checked first and all missing
    ones are reported in one CheckpointError. Then: tokenizer (``num_img_tokens`` image tokens), visual
    tokenizer (``cfg.visual_tokenizer``), agent (``cfg.agent``; vocabulary = the tokenizer's length),
    de-tokenizer (``cfg.detokenizer.resampler`` on the SDXL base; VAE kept in fp32), generation settings from
    ``cfg.generation``. ``device``/``dtype`` default to ``cfg.runtime``; ``cpu_offload`` and
    ``llm_quantization`` from ``cfg.runtime`` are applied by ``SeedStoryPipeline.place``."""
    from ..config import GenerationSettings, runtime_options
    from ..models.detokenizer import Detokenizer
    from ..pipeline import SeedStoryPipeline

    c = _plain(cfg)
    rt = runtime_options(c.get("runtime") or {}, device=device, dtype=dtype)
    settings = GenerationSettings.from_config(c.get("generation") or {})
    agent_cfg = release_agent_config(c)
    check_release_files(c)
    paths = release_paths(c)
    n_img = int(c.get("num_img_tokens", 64))

    tokenizer = load_release_tokenizer(paths["tokenizer"], n_img)
    vit = load_release_visual_tokenizer(paths["visual_tokenizer"], c.get("visual_tokenizer") or {}, rt.dtype)
    agent = load_release_agent(paths["agent"], paths["llm_base"], agent_cfg, rt.dtype, vocab_size=len(tokenizer))
    res_cfg = (c.get("detokenizer") or {}).get("resampler") or {}
    resampler, unet, vae, scheduler = load_release_detokenizer(paths["detokenizer"], paths["sdxl_base"], res_cfg,
                                                               rt.dtype)
    detok = Detokenizer(resampler, unet, vae, scheduler)
    pipe = SeedStoryPipeline(tokenizer, vit, agent, detok, settings, name=c.get("name", "seed-story-george"))
    return pipe.place(rt.device, cpu_offload=rt.cpu_offload, llm_quantization=rt.llm_quantization)


def convert_release(release_root: str, out: str, preset="seed-story-george", overwrite: bool = False,
                    dtype=None) -> str:
    """Load the released files under ``release_root`` with ``preset`` (a name, a YAML path or a loaded
    config; its ``release.root`` is replaced by ``release_root``) and write our format to ``out``
    (``SeedStoryPipeline.save_pretrained``: per component config.json + .safetensors), which then loads with
    ``SeedStoryPipeline.from_pretrained(out)`` without the original files. Loads on the CPU; ``dtype``
    (torch dtype or fp32/bf16/fp16; default fp32, lossless) is the dtype written (the VAE stays fp32).
    A non-empty ``out`` is refused unless ``overwrite``; the folder is written beside ``out`` first and
    renamed into place, so a failed conversion leaves nothing half-written. Returns ``out``."""
    from ..atomic import write_dir

    from ..config import DTYPES, PresetError, load_preset

    cfg = _plain(load_preset(preset) if isinstance(preset, str) else preset)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PresetError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(f"{out} is not empty; pass --force (overwrite=True) to replace it")
    cfg["release"] = {**(cfg.get("release") or {}), "root": os.path.abspath(release_root)}
    cfg["runtime"] = {**(cfg.get("runtime") or {}), "device": "cpu", "cpu_offload": False,
                      "llm_quantization": "none"}
    pipe = load_release_pipeline(cfg, device=torch.device("cpu"), dtype=dtype)

    return write_dir(out, pipe.save_pretrained)


__all__ = [
    "AGENT_FILES", "AgentPlan", "CheckpointError", "DETOKENIZER_FILES", "RELEASE_FILES", "RELEASE_KEYS",
    "ReleaseFile", "Requirement", "TensorMeta", "VISUAL_TOKENIZER_NAMES", "agent_release_names",
    "check_release_agent", "check_release_detokenizer", "check_release_files", "check_release_visual_tokenizer",
    "check_state_dict", "convert_release", "detokenizer_release_names", "diffusers_weight_files",
    "inspect_checkpoint", "is_peft_extra", "key_family", "load_release_agent", "load_release_detokenizer",
    "load_release_detokenizer_weights", "load_release_pipeline", "load_release_tokenizer",
    "load_release_visual_tokenizer", "meta_state", "missing_release_files", "read_state_dict",
    "release_agent_config", "release_entry", "release_manifest", "release_manifest_summary", "release_path",
    "release_paths", "release_requirements", "release_root", "resolve_visual_tokenizer_path",
    "safetensors_header", "sdxl_component_shapes",
]
