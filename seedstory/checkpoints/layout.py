"""Where each released file goes under ``./pretrained``, what it is and where a user gets it
(``RELEASE_FILES``, docs/formats.md §1); a missing one raises a CheckpointError that says all three.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

from .files import CheckpointError


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    path: str  # relative to ./pretrained
    what: str
    source: str  # where a user gets it
    manifest: Optional[str] = None  # packaged key manifest (``release_manifest``)
    is_dir: bool = False
    hub_repo: Optional[str] = None  # the Hugging Face repository ``seedstory download`` fetches it from
    gated: bool = False  # the repository asks for an accepted licence and a token (HF_TOKEN)

    def describe(self, root: str = "pretrained") -> str:
        kind = "folder" if self.is_dir else "file"
        return f"{self.what}; expected {kind}: {os.path.join(root, self.path)}; get it from {self.source}"


SEED_STORY_REPO = "TencentARC/SEED-Story"
_SEED_STORY = f"Hugging Face {SEED_STORY_REPO}"
RELEASE_FILES: dict[str, ReleaseFile] = {
    f.name: f
    for f in [
        ReleaseFile("seed_story_george_sft", "seed_story/george_sft/pytorch_model.bin",
                    "SEED-Story-George agent (LoRA-tuned Llama-2-7b + input/output resamplers)",
                    f"{_SEED_STORY} (seed_story/george_sft/pytorch_model.bin)", "agent_seed_story_george_sft",
                    hub_repo=SEED_STORY_REPO),
        ReleaseFile("seedx_pretrained", "seedx/checkpoint-30000/pytorch_model.bin",
                    "SEED-X-pretrained agent (same layout as SEED-Story-George)",
                    "Hugging Face AILab-CVC/SEED-X-17B (the SEED-Story README also lists it among the "
                    f"{_SEED_STORY} files)", "agent_seedx_pretrained", hub_repo=SEED_STORY_REPO),
        ReleaseFile("detokenizer_pretrained", "detokenizer_pretrained/checkpoint-55000/pytorch_model.bin",
                    "pre-trained de-tokenizer (XL resampler + SDXL UNet)",
                    f"{_SEED_STORY} (detokenizer_pretrained/checkpoint-55000/pytorch_model.bin)",
                    "detokenizer_pretrained", hub_repo=SEED_STORY_REPO),
        ReleaseFile("detokenizer_george_adapted",
                    "detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin",
                    "Detokenizer-George (StoryStream-adapted de-tokenizer)",
                    f"{_SEED_STORY} (detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin)",
                    "detokenizer_george_adapted", hub_repo=SEED_STORY_REPO),
        ReleaseFile("visual_tokenizer", "visual_tokenizer/qwen_vit_G.pt",
                    "visual tokenizer (Qwen-VL-Chat's ViT-bigG with attention pool, plain state dict; "
                    "qwen_vit_G.safetensors in the same folder is accepted too)",
                    "Hugging Face AILab-CVC/SEED-X-17B, or extract it from a Hugging Face Qwen/Qwen-VL-Chat download "
                    "with `python -m seedstory extract-vit --qwen-vl-chat DIR --out pretrained/visual_tokenizer/` "
                    "(what the reference's src/tools/reload_qwen_vit.py does)", "qwen_vit_G",
                    hub_repo="Qwen/Qwen-VL-Chat"),
        ReleaseFile("tokenizer", "cvlm_llama2_tokenizer",
                    "Llama-2 SentencePiece tokenizer with <img>, </img>, <img_00000>..<img_00063> added",
                    f"{_SEED_STORY} (cvlm_llama2_tokenizer/)", is_dir=True, hub_repo=SEED_STORY_REPO),
        ReleaseFile("llama2_7b", "Llama-2-7b-hf", "Llama-2-7b base weights (HF layout: config.json + weights)",
                    "Hugging Face meta-llama/Llama-2-7b-hf (gated: accept the licence first)", is_dir=True,
                    hub_repo="meta-llama/Llama-2-7b-hf", gated=True),
        ReleaseFile("sdxl_base", "stable-diffusion-xl-base-1.0",
                    "SDXL base (diffusers layout: unet/, vae/, scheduler/)",
                    "Hugging Face stabilityai/stable-diffusion-xl-base-1.0", is_dir=True,
                    hub_repo="stabilityai/stable-diffusion-xl-base-1.0"),
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
        require_file(path, (name,))
    return path


def require_file(path: str, candidates: Iterable[str], is_dir: bool = False) -> None:
    """Raise CheckpointError naming ``path``, what it is and where it comes from, unless it exists."""
    exists = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if exists:
        return
    norm = os.path.normpath(path).replace(os.sep, "/")
    infos = [RELEASE_FILES[c] for c in candidates]
    exact = [f for f in infos if norm.endswith(f.path.rstrip("/"))]
    lines = "\n".join("  - " + f.describe() for f in (exact or infos))
    raise CheckpointError(f"{path}: not found. It should be:\n{lines}")


__all__ = [
    "AGENT_FILES", "DETOKENIZER_FILES", "RELEASE_FILES", "ReleaseFile", "release_path", "require_file",
]
