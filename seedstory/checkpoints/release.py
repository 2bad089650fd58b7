"""The released SEED-Story weights as a whole: which files a release preset names, whether they are all
there, and loading them into one ``SeedStoryPipeline`` (or converting them to our format).

Each file has its own module (docs/formats.md §1-§5), all reading local files only; nothing is downloaded.
Files live under ``./pretrained`` (``layout.RELEASE_FILES``):

- ``visual_tokenizer/qwen_vit_G.pt``: ``release_vit.load_release_visual_tokenizer``.
- ``seed_story/george_sft/pytorch_model.bin`` and ``seedx/checkpoint-30000/pytorch_model.bin`` on top of
  ``Llama-2-7b-hf/``: ``release_agent.load_release_agent``.
- ``detokenizer_pretrained/...`` and ``detokenizer/detokenizer_george_adapted/...`` on top of
  ``stable-diffusion-xl-base-1.0/``: ``release_detokenizer.load_release_detokenizer``.
- ``cvlm_llama2_tokenizer/``: ``release_tokenizer.load_release_tokenizer``.

``.bin``/``.pt`` files are only ever opened with ``torch.load(weights_only=True)`` (``files``). A loaded module
never comes out half-initialized: each parameter comes from the release file or from a named base (Llama-2 base
folder, SDXL base UNet, or a deterministic table), otherwise ``CheckpointError`` lists what is missing
(``validation``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Collection, Optional

import torch

from .files import CheckpointError
from .layout import AGENT_FILES, RELEASE_FILES, ReleaseFile
from .release_agent import load_release_agent
from .release_detokenizer import DIFFUSERS_WEIGHTS, diffusers_weight_files, load_release_detokenizer
from .release_tokenizer import load_release_tokenizer
from .release_vit import load_release_visual_tokenizer, resolve_visual_tokenizer_path

# preset ``release.<key>`` -> the RELEASE_FILES entries it may name (the first is the default).
RELEASE_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer",),
    "llm_base": ("llama2_7b",),
    "agent": AGENT_FILES,
    "visual_tokenizer": ("visual_tokenizer",),
    "sdxl_base": ("sdxl_base",),
    "detokenizer": ("detokenizer_george_adapted", "detokenizer_pretrained"),
}
DEFAULT_RELEASE = {"root": "pretrained", "tokenizer": "cvlm_llama2_tokenizer", "llm_base": "Llama-2-7b-hf",
                   "agent": RELEASE_FILES["seed_story_george_sft"].path,
                   "visual_tokenizer": RELEASE_FILES["visual_tokenizer"].path,
                   "sdxl_base": "stable-diffusion-xl-base-1.0",
                   "detokenizer": RELEASE_FILES["detokenizer_george_adapted"].path}


def plain_config(cfg) -> dict:
    """A preset (DictConfig, dict or None) as a plain dict, interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def release_root(cfg) -> str:
    """The preset's ``release.root``: relative paths are relative to the repository root (so ``pretrained``
    is ``<repo>/pretrained`` from any working directory); absolute paths are kept."""
    from ..config import resolve_path

    return resolve_path(str((plain_config(cfg).get("release") or {}).get("root", "pretrained")))


def release_entry(key: str, rel: str) -> ReleaseFile:
    """The RELEASE_FILES entry a preset ``release.<key>`` path stands for (matched by its release path)."""
    names = RELEASE_KEYS[key]
    norm = rel.replace(os.sep, "/").rstrip("/")
    for n in names:
        if norm.endswith(RELEASE_FILES[n].path):
            return RELEASE_FILES[n]
    return RELEASE_FILES[names[0]]


def release_names(cfg) -> dict[str, str]:
    """The preset's ``release`` section over ``DEFAULT_RELEASE``: ``{key: path under the root}``."""
    return {**DEFAULT_RELEASE, **(plain_config(cfg).get("release") or {})}


def release_entries(cfg) -> dict[str, ReleaseFile]:
    """``{key: the RELEASE_FILES entry}`` each of the preset's release paths stands for."""
    rel = release_names(cfg)
    return {k: release_entry(k, str(rel[k])) for k in RELEASE_KEYS}


def release_paths(cfg) -> dict[str, str]:
    """``{key: absolute path}`` for the preset's ``release`` section (keys of ``RELEASE_KEYS``), joined to
    ``release_root``; the visual tokenizer path goes through ``resolve_visual_tokenizer_path``."""
    rel = release_names(cfg)
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
    p = release_paths(cfg)
    e = release_entries(cfg)
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
    name = plain_config(cfg).get("name", "release")
    head = (f"the release folder {root} does not exist" if not os.path.isdir(root)
            else f"{len(missing)} release file(s) missing under {root}")
    lines = "\n".join("  - " + r.describe() for r in missing)
    raise CheckpointError(f"preset {name!r}: {head}:\n{lines}\n"
                          f"(`python -m seedstory doctor --preset {name}` checks the whole folder in seconds)")


def release_agent_config(cfg) -> dict:
    """``load_release_agent``'s config from a preset's ``agent`` section (``lora: {r, alpha}`` ->
    ``lora_r``/``lora_alpha``); checks that the input resampler has ``num_img_tokens`` slots."""
    from ..config import PresetError

    c = plain_config(cfg)
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


def load_release_pipeline(cfg, device=None, dtype: Optional[torch.dtype] = None, weightless: Collection[str] = ()):
    """A preset with ``source: release`` -> ``SeedStoryPipeline``.

    Paths come from ``cfg.release`` (``release_paths``); every needed file is checked first and all missing
    ones are reported in one CheckpointError. Then: tokenizer (``num_img_tokens`` image tokens), visual
    tokenizer (``cfg.visual_tokenizer``), agent (``cfg.agent``; vocabulary = the tokenizer's length),
    de-tokenizer (``cfg.detokenizer.resampler`` on the SDXL base; VAE kept in fp32), generation settings from
    ``cfg.generation``. ``device``/``dtype`` default to ``cfg.runtime``; ``cpu_offload`` and
    ``llm_quantization`` from ``cfg.runtime`` are applied by ``SeedStoryPipeline.place``. ``weightless``: as
    ``SeedStoryPipeline.from_pretrained``'s (on the CPU, not placed)."""
    from ..config import GenerationSettings, runtime_options
    from ..models.detokenizer import Detokenizer
    from ..pipeline import SeedStoryPipeline, check_weightless

    c = plain_config(cfg)
    rt = runtime_options(c.get("runtime") or {}, device=device, dtype=dtype)
    check_weightless(weightless, rt.device,
                     placed=rt.cpu_offload or rt.llm_quantization is not None or rt.detokenizer_device is not None)
    settings = GenerationSettings.from_config(c.get("generation") or {})
    agent_cfg = release_agent_config(c)
    check_release_files(c)
    paths = release_paths(c)
    n_img = int(c.get("num_img_tokens", 64))

    tokenizer = load_release_tokenizer(paths["tokenizer"], n_img)
    vit = load_release_visual_tokenizer(paths["visual_tokenizer"], c.get("visual_tokenizer") or {}, rt.dtype,
                                        weightless="visual_tokenizer" in weightless)
    agent = load_release_agent(paths["agent"], paths["llm_base"], agent_cfg, rt.dtype, vocab_size=len(tokenizer),
                               weightless="agent" in weightless)
    res_cfg = (c.get("detokenizer") or {}).get("resampler") or {}
    resampler, unet, vae, scheduler = load_release_detokenizer(paths["detokenizer"], paths["sdxl_base"], res_cfg,
                                                               rt.dtype, weightless="detokenizer" in weightless)
    detok = Detokenizer(resampler, unet, vae, scheduler)
    pipe = SeedStoryPipeline(tokenizer, vit, agent, detok, settings, name=c.get("name", "seed-story-george"))
    if weightless:
        return pipe
    return pipe.place(rt.device, cpu_offload=rt.cpu_offload, llm_quantization=rt.llm_quantization,
                      detokenizer_device=rt.detokenizer_device)


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

    cfg = plain_config(load_preset(preset) if isinstance(preset, str) else preset)
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
    "DEFAULT_RELEASE", "RELEASE_KEYS", "Requirement", "check_release_files", "convert_release",
    "load_release_pipeline", "missing_release_files", "plain_config", "release_agent_config", "release_entry",
    "release_entries", "release_names", "release_paths", "release_requirements", "release_root",
]
