"""Presets: YAML files under ``configs/presets`` (omegaconf), data not code.

A preset names where weights come from (``source``: ``random`` for tiny test models, ``pretrained``
for a directory in our own format, ``release`` for the official SEED-Story files) plus component sizes,
generation defaults and runtime options (dtype, device, offload, quantization).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf


def _project_root() -> str:
    """The folder holding ``configs/`` and ``assets/`` (the presets, the demo model): ``$SEEDSTORY_HOME`` when set,
    else the clone this package lives in (also under ``pip install -e .``), else the current folder (a
    ``pip install .`` used from inside a clone)."""
    if os.environ.get("SEEDSTORY_HOME"):
        return os.path.abspath(os.environ["SEEDSTORY_HOME"])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return here if os.path.isdir(os.path.join(here, "configs", "presets")) else os.getcwd()


REPO_ROOT = _project_root()
PRESET_DIR = os.path.join(REPO_ROOT, "configs", "presets")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class PresetError(ValueError):
    pass


def list_presets() -> list[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_preset(name_or_path: str, overrides: Optional[list[str] | dict] = None) -> DictConfig:
    """Load a preset by name (``tiny``), YAML path, or a folder in our ``from_pretrained`` format (a
    training run's ``final/``, a ``convert`` output), with dotted overrides (``["runtime.dtype=bf16"]``)."""
    if os.path.isfile(os.path.join(name_or_path, "seedstory.json")):
        path = os.path.abspath(name_or_path)
        cfg = OmegaConf.create({"name": os.path.basename(path.rstrip(os.sep)) or path, "source": "pretrained",
                                "path": path, "runtime": {"device": "auto", "dtype": "auto"}})
    else:
        path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, name_or_path + ".yaml")
        if not os.path.isfile(path):
            raise PresetError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets()) or 'none'}, "
                              "a preset YAML file, or a folder holding seedstory.json")
        cfg = OmegaConf.load(path)
    if overrides:
        extra = OmegaConf.from_dotlist(list(overrides)) if isinstance(overrides, list) else OmegaConf.create(overrides)
        _check_sections(extra)
        cfg = OmegaConf.merge(cfg, extra)
    cfg.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return cfg


# A preset's top-level keys; an override outside them (``temperature=0.5`` for ``generation.temperature=0.5``)
# would be silently ignored by every reader.
PRESET_SECTIONS = ("name", "description", "source", "path", "num_img_tokens", "init_seed", "examples", "tokenizer",
                   "release", "visual_tokenizer", "agent", "detokenizer", "generation", "runtime")


def _check_sections(extra) -> None:
    for key in extra:
        if key in PRESET_SECTIONS:
            continue
        hint = ""
        if key in {f.name for f in dataclasses.fields(GenerationSettings)}:
            hint = f"; did you mean generation.{key}?"
        elif key in ("device", "dtype", "cpu_offload", "llm_quantization"):
            hint = f"; did you mean runtime.{key}?"
        raise PresetError(f"unknown preset setting {key!r}{hint} (top-level keys: {', '.join(PRESET_SECTIONS)})")


def resolve_path(path: str) -> str:
    """Relative paths in presets are relative to the repository root, so presets work from any cwd."""
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise PresetError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16, auto")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # fp16 matmuls are slow or missing on CPU
    return dtype


def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


REPETITION_SCOPES = ("tokens", "words", "word_starts")
CONTEXT_SOURCES = ("features", "picture")
MAX_CANDIDATES = 16  # pictures painted per frame at most (GenerationSettings.candidates)
MAX_CAPTION_CANDIDATES = 16  # captions drawn per frame at most (GenerationSettings.caption_candidates)


@dataclass
class GenerationSettings:
    """Per-call generation settings with the preset's defaults."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "euler"
    height: Optional[int] = None
    width: Optional[int] = None
    seed: int = 42
    window: int = 8
    max_new_tokens: int = 120
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    # HF-style (CTRL) penalty on the tokens of the previous frame's text and of the text so far; 1 = off.
    # Small story models otherwise tend to copy the previous caption word for word.
    repetition_penalty: float = 1.0
    # What the penalty counts as repeated: "tokens" (as transformers), "words" (``Wex`` at a caption's start
    # and `` Wex`` later are one word), "word_starts" (words, and never a word's inner pieces).
    repetition_scope: str = "tokens"
    # When sampling, a new caption that repeats (word for word) one of the last N captions on its path is
    # drawn again (up to engine.CAPTION_RETRIES more times; when all repeat, the likeliest is kept); 0 = off. The
    # token penalty above only sees the previous caption, so small models fall into two-frame loops (A, B, A, B, ...)
    # without this.
    no_repeat_captions: int = 0
    # When sampling, captions drawn per frame; the likeliest under the agent (its logits with the penalty, before
    # temperature and top-p) that does not repeat a recent one is kept: near-greedy captions that still move
    # on, where greedy decoding would loop and one draw at a temperature is often impossible. They are drawn as one
    # batch: k times the text's cache memory while writing. 1 = off.
    caption_candidates: int = 1
    # Pictures painted per frame (seeds seed, seed+1, ...); the one the visual tokenizer reads back closest to
    # the features it was painted from is kept, as DALL-E reranked its samples with CLIP. 1 = off. They are
    # painted as one batch: k times the de-tokenizer's work and memory.
    candidates: int = 1
    # What a generated frame's picture puts into the context: "features", the agent's predicted features (the
    # release), or "picture", the painted picture read back by the visual tokenizer (the features the agent
    # learned to read from; the picture the person sees). The opening is always its picture's.
    context_from: str = "features"
    max_frames: int = 50

    @classmethod
    def from_config(cls, cfg: Any) -> "GenerationSettings":
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise PresetError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(**data).validated()

    def replace(self, **changes) -> "GenerationSettings":
        data = asdict(self)
        data.update({k: v for k, v in changes.items() if v is not None})
        return GenerationSettings(**data).validated()

    def validated(self) -> "GenerationSettings":
        """Raise PresetError naming the first setting out of range."""
        checks = [
            (self.num_inference_steps >= 1, "image steps must be at least 1"),
            (self.guidance_scale >= 0, "guidance must not be negative"),
            (self.window >= 1, "the context window must hold at least one frame"),
            (1 <= self.max_new_tokens <= 4096, "max_new_tokens must be between 1 and 4096"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens"),
            (self.temperature > 0, "temperature must be positive"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (1 <= self.repetition_penalty <= 10, "repetition_penalty must be between 1 (off) and 10"),
            (self.repetition_scope in REPETITION_SCOPES,
             f"repetition_scope must be one of {', '.join(REPETITION_SCOPES)}"),
            (0 <= self.no_repeat_captions <= 100, "no_repeat_captions must be between 0 (off) and 100"),
            (1 <= self.candidates <= MAX_CANDIDATES, f"candidates must be between 1 (off) and {MAX_CANDIDATES}"),
            (1 <= self.caption_candidates <= MAX_CAPTION_CANDIDATES,
             f"caption_candidates must be between 1 (off) and {MAX_CAPTION_CANDIDATES}"),
            (self.context_from in CONTEXT_SOURCES, f"context_from must be one of {', '.join(CONTEXT_SOURCES)}"),
            (self.max_frames >= 2, "max_frames must be at least 2"),
            (self.height is None or (self.height >= 8 and self.height % 8 == 0), "height must be a multiple of 8"),
            (self.width is None or (self.width >= 8 and self.width % 8 == 0), "width must be a multiple of 8"),
        ]
        for ok, message in checks:
            if not ok:
                raise PresetError(message)
        return self


LLM_QUANTIZATION = ("8bit", "4bit")
_FALSE = (None, False, "none", "None", "no", "false", "off", "")


@dataclass(frozen=True)
class RuntimeOptions:
    """A preset's ``runtime`` section, resolved and checked before anything loads."""

    device: torch.device
    dtype: torch.dtype
    cpu_offload: bool = False  # ViT and de-tokenizer live on the CPU, each moved to ``device`` only while it runs
    llm_quantization: Optional[str] = None  # None, "8bit" or "4bit" (bitsandbytes; the LLM's decoder Linears)
    # The de-tokenizer on a device of its own (``cuda:1``, ``cpu``): it paints beside the LLM (``StoryEngine.steps``).
    detokenizer_device: Optional[torch.device] = None


def runtime_options(runtime: Any = None, device=None, dtype: Optional[torch.dtype] = None) -> RuntimeOptions:
    """Resolve ``runtime`` (``device``, ``dtype``, ``cpu_offload``, ``llm_quantization``); ``device``/``dtype``
    given by the caller win. Raises PresetError for unknown values, and for quantization without a CUDA device
    or without the bitsandbytes package, so a preset fails before minutes of loading."""
    if isinstance(runtime, DictConfig):
        runtime = OmegaConf.to_container(runtime, resolve=True)
    runtime = dict(runtime or {})
    device = resolve_device(runtime.get("device")) if device is None else torch.device(device)
    dtype = dtype or resolve_dtype(runtime.get("dtype"), device)
    offload = runtime.get("cpu_offload", False)
    if isinstance(offload, str):
        if offload.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise PresetError(f"runtime.cpu_offload must be true or false, got {offload!r}")
        offload = offload.lower() in ("true", "yes", "on", "1")
    quant = runtime.get("llm_quantization")
    quant = None if quant in _FALSE else str(quant).lower().replace("-", "")
    if quant in ("int8", "8"):
        quant = "8bit"
    if quant in ("int4", "nf4", "4"):
        quant = "4bit"
    if quant is not None:
        if quant not in LLM_QUANTIZATION:
            raise PresetError(f"runtime.llm_quantization must be none, 8bit or 4bit, got {runtime['llm_quantization']!r}")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise PresetError(f"runtime.llm_quantization={quant} needs a CUDA GPU (bitsandbytes kernels), but the "
                              f"device is {device.type}{'' if torch.cuda.is_available() else ' (no CUDA GPU found)'}; "
                              "set runtime.llm_quantization=none")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise PresetError(f"runtime.llm_quantization={quant} needs the bitsandbytes package "
                              "(pip install bitsandbytes); or set runtime.llm_quantization=none")
    detok = runtime.get("detokenizer_device")
    detok = None if detok in _FALSE or detok == "" else torch.device(str(detok))
    if detok is not None and detok.type == "cuda" and (not torch.cuda.is_available()
                                                      or (detok.index or 0) >= torch.cuda.device_count()):
        raise PresetError(f"runtime.detokenizer_device={runtime['detokenizer_device']!r}: there is no such GPU here "
                          f"({torch.cuda.device_count()} found)")
    return RuntimeOptions(device, dtype, bool(offload), quant, detok)
