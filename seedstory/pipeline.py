"""The SEED-Story model stack as one object: tokenizer, visual tokenizer, agent, de-tokenizer.

Components are passed in explicitly (diffusers style). ``from_preset`` builds them from a preset,
``save_pretrained``/``from_pretrained`` use our own directory format:

    DIR/seedstory.json        format marker, sizes, generation defaults
    DIR/tokenizer/            Hugging Face tokenizer files
    DIR/visual_tokenizer/     config.json + safetensors
    DIR/agent/                llm/ (transformers), input_resampler/, output_resampler/
    DIR/detokenizer/          resampler/, unet/, vae/, scheduler/

Low-VRAM placement (``place``, from a preset's ``runtime``): with ``cpu_offload`` the ViT and the de-tokenizer
stay on the CPU and each is moved to ``offload_device`` only while it runs (``encode_image``,
``negative_features``, ``paint``); the LLM stays on the GPU. ``llm_quantization`` swaps the LLM's decoder
Linears for bitsandbytes 8-/4-bit layers (``seedstory.checkpoints.quantization``).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from typing import Collection, Optional, Sequence, Union

import torch
from PIL import Image

from .config import GenerationSettings, PresetError, load_preset, resolve_device, resolve_path, runtime_options
from .familiarity import FAMILIARITY_FILE, Familiarity
from .image_processing import ImageProcessor
from .models.agent import SeedStoryAgent
from .models.detokenizer import Detokenizer
from .models.qwen_vit import QwenVisionTransformer
from .prompt import PromptFormat

FORMAT_NAME = "seedstory"
FORMAT_VERSION = 1
CONFIG_FILE = "seedstory.json"
COMPONENTS = ("visual_tokenizer", "agent", "detokenizer")


class SeedStoryPipeline:
    def __init__(
        self,
        tokenizer,
        visual_tokenizer: QwenVisionTransformer,
        agent: SeedStoryAgent,
        detokenizer: Detokenizer,
        settings: Optional[GenerationSettings] = None,
        name: str = "custom",
    ):
        self.tokenizer = tokenizer
        self.visual_tokenizer = visual_tokenizer.eval()
        self.agent = agent.eval()
        self.detokenizer = detokenizer.eval()
        self.settings = settings or GenerationSettings()
        self.name = name
        self.prompt = PromptFormat(tokenizer, agent.num_img_tokens)
        self.image_processor = ImageProcessor(visual_tokenizer.config.image_size)
        self._negative: Optional[torch.Tensor] = None
        # Set by ``place(cpu_offload=True)``: where the CPU-resident ViT and de-tokenizer run.
        self.offload_device: Optional[torch.device] = None
        self.detokenizer_device: Optional[torch.device] = None  # set by ``place``: the de-tokenizer's own device
        self.llm_quantization: Optional[str] = None
        # Statistics of the training pictures' features, when the model ships them (``seedstory.familiarity``).
        self.familiarity: Optional[Familiarity] = None
        self.check_sizes()

    def check_sizes(self) -> None:
        """Raise when the components' sizes do not fit together (features, resamplers, vocabulary)."""
        vit_dim = self.visual_tokenizer.config.output_dim
        n_vit = self.visual_tokenizer.config.n_queries
        problems = []
        if self.agent.input_resampler.config.kv_dim not in (None, vit_dim) and self.agent.input_resampler.embed_dim != vit_dim:
            problems.append(f"input resampler expects {self.agent.input_resampler.config.kv_dim}-d features, ViT gives {vit_dim}")
        if self.agent.output_resampler.embed_dim != vit_dim or self.agent.output_resampler.num_queries != n_vit:
            problems.append("output resampler does not produce ViT-shaped features")
        if self.detokenizer.resampler.config.embedding_dim != vit_dim:
            problems.append(f"de-tokenizer expects {self.detokenizer.resampler.config.embedding_dim}-d features, ViT gives {vit_dim}")
        if len(self.tokenizer) > self.agent.llm.get_input_embeddings().weight.shape[0]:
            problems.append("the tokenizer has more tokens than the LLM's embedding table")
        if problems:
            raise ValueError("components do not fit together: " + "; ".join(problems))

    # -- devices -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.agent.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SeedStoryPipeline":
        """Move/cast every component. With CPU offload on, only the agent moves; the ViT and de-tokenizer
        are cast but stay on the CPU and will run on ``device``."""
        def cast(module, device=None):
            # a dtype only when it changes: diffusers warns on every ModelMixin.to given one (even None)
            change = {"dtype": dtype} if dtype is not None and dtype != module.dtype else {}
            module.to(device=device, **change)

        if self.offload_device is not None:
            self.agent.to(device=device, dtype=dtype)
            for module in (self.visual_tokenizer, self.detokenizer):
                cast(module)
            if device is not None:
                self.offload_device = torch.device(device)
        else:
            for module in (self.visual_tokenizer, self.agent, self.detokenizer):
                cast(module, device)
        self._negative = None
        return self

    def place(self, device, cpu_offload: bool = False, llm_quantization: Optional[str] = None,
              detokenizer_device=None) -> "SeedStoryPipeline":
        """Put the components where a preset's ``runtime`` says, keeping each one's dtype (so an fp32 VAE
        stays fp32). ``llm_quantization`` ("8bit"/"4bit", CUDA + bitsandbytes) quantizes the LLM's decoder
        Linears layer by layer on their way to ``device``; ``cpu_offload`` keeps the ViT and the de-tokenizer
        on the CPU, moving each to ``device`` only while it runs; ``detokenizer_device`` puts the de-tokenizer
        on a device of its own (where it stays, offload or not), so it paints beside the LLM."""
        device = torch.device(device)
        if llm_quantization:
            from .checkpoints.quantization import quantize_llm

            quantize_llm(self.agent.llm, llm_quantization, device, compute_dtype=self.agent.dtype)
            self.llm_quantization = llm_quantization
        self.agent.to(device)
        home = torch.device("cpu") if cpu_offload else device
        self.visual_tokenizer.to(home)
        self.detokenizer_device = torch.device(detokenizer_device) if detokenizer_device is not None else None
        self.detokenizer.to(self.detokenizer_device or home)
        self.offload_device = device if cpu_offload else None
        self._negative = None
        return self

    @contextlib.contextmanager
    def _running(self, module: torch.nn.Module):
        """Run ``module`` on ``offload_device`` (moved there for the duration) when CPU offload is on."""
        if self.offload_device is None or (module is self.detokenizer and self.detokenizer_device is not None):
            yield module
            return
        module.to(self.offload_device)
        try:
            yield module
        finally:
            module.to("cpu")

    # -- images ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> ViT features [1, n_queries, D] (fp32, on CPU, so frames can be stored anywhere)."""
        with self._running(self.visual_tokenizer) as vit:
            pixels = self.image_processor(image).to(vit.device, vit.dtype)
            return vit(pixels).float().cpu()

    def unfamiliarity(self, image: Image.Image) -> Optional[float]:
        """How far ``image`` is from the pictures the model was trained on (above 1: unlike any of them); None
        when the model ships no statistics of its training pictures."""
        if self.familiarity is None:
            return None
        return float(self.familiarity.distance(self.encode_image(image))[0])

    def negative_features(self) -> torch.Tensor:
        if self._negative is None:
            with self._running(self.visual_tokenizer) as vit:
                self._negative = vit.unconditional_features().float().cpu()
        return self._negative

    @torch.no_grad()
    def paint(
        self,
        features: torch.Tensor,
        seed: Optional[int] = None,
        settings: Optional[GenerationSettings] = None,
        callback=None,
    ) -> Image.Image:
        """Features [1, n, D] -> one PIL image, through the de-tokenizer with the zero-image negative.

        With ``settings.candidates`` = k > 1, k pictures are painted (seeds seed .. seed+k-1, one batch) and
        the one whose re-encoded features are closest to ``features`` is returned (``closest_picture``);
        candidate 0 is the picture k = 1 paints."""
        s = settings or self.settings
        seed = s.seed if seed is None else seed
        k = s.candidates
        negative = self.negative_features()  # before the de-tokenizer takes the GPU
        with self._running(self.detokenizer) as detok:
            dev, dt = detok.unet.device, detok.unet.dtype
            pictures = detok.generate(
                features.to(dev, dt).expand(k, -1, -1),
                negative_features=negative.to(dev, dt),
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                height=s.height,
                width=s.width,
                seed=seed if k == 1 or seed is None else [seed + i for i in range(k)],
                scheduler=s.scheduler,
                callback=callback,
            )
        return pictures[0] if k == 1 else pictures[self.closest_picture(features, pictures)]

    @torch.no_grad()
    def picture_scores(self, features: torch.Tensor, pictures: Sequence[Image.Image]) -> list[float]:
        """How well each picture shows ``features`` [1, n, D]: the cosine between the features the visual
        tokenizer reads back from the picture and ``features``, all n tokens as one vector."""
        target = features.float().cpu().flatten()
        return [float(torch.nn.functional.cosine_similarity(self.encode_image(p).flatten(), target, dim=0))
                for p in pictures]

    def closest_picture(self, features: torch.Tensor, pictures: Sequence[Image.Image]) -> int:
        """Index of the picture that shows ``features`` best (the first of equals)."""
        scores = self.picture_scores(features, pictures)
        return max(range(len(scores)), key=scores.__getitem__)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        if self.llm_quantization:
            raise ValueError("a pipeline with a quantized LLM cannot be saved; load it without llm_quantization")
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.visual_tokenizer.save_pretrained(os.path.join(path, "visual_tokenizer"))
        self.agent.save_pretrained(os.path.join(path, "agent"))
        self.detokenizer.save_pretrained(os.path.join(path, "detokenizer"))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": self.name,
                "num_img_tokens": self.agent.num_img_tokens, "generation": asdict(self.settings)}
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if self.familiarity is not None:
            self.familiarity.save(path)

    @classmethod
    def from_pretrained(
        cls, path: str, device: Union[str, torch.device, None] = None, torch_dtype: Optional[torch.dtype] = None,
        weightless: Collection[str] = (),
    ) -> "SeedStoryPipeline":
        """Load a directory written by ``save_pretrained`` (or ``python -m seedstory convert``). ``weightless``:
        components (``visual_tokenizer``, ``agent``, ``detokenizer``) built without reading their weights, their
        parameters on the meta device, on the CPU: what a training process other than the first loads of the parts
        FSDP or ZeRO-3 fill in from the first one's copy, or that it does not use (training/common.py)."""
        from .checkpoints.validation import from_folder
        from .tokens import load_tokenizer

        meta_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(meta_path):
            raise PresetError(f"{path} is not a seedstory model directory (no {CONFIG_FILE})")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_NAME:
            raise PresetError(f"{meta_path} is not a seedstory model config")
        device = resolve_device(device) if not isinstance(device, torch.device) else device
        check_weightless(weightless, device)
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"), meta.get("num_img_tokens"))
        vit = from_folder(QwenVisionTransformer, os.path.join(path, "visual_tokenizer"), torch_dtype,
                          "visual_tokenizer" in weightless)
        agent = SeedStoryAgent.from_pretrained(os.path.join(path, "agent"), torch_dtype=torch_dtype,
                                               weightless="agent" in weightless)
        detok = Detokenizer.from_pretrained(os.path.join(path, "detokenizer"), torch_dtype=torch_dtype,
                                            weightless="detokenizer" in weightless)
        settings = GenerationSettings.from_config(meta.get("generation", {}))
        pipe = cls(tokenizer, vit, agent, detok, settings, name=meta.get("name", os.path.basename(path)))
        if not weightless:  # (built on the CPU; meta parameters cannot be moved)
            pipe.to(device)
        pipe.familiarity = Familiarity.load(path)
        if pipe.familiarity is not None and pipe.familiarity.mean.numel() != vit.config.n_queries * vit.config.output_dim:
            raise PresetError(f"{path}: {FAMILIARITY_FILE} was fitted to another visual tokenizer")
        return pipe

    @classmethod
    def from_preset(cls, preset, overrides=None, weightless: Collection[str] = ()) -> "SeedStoryPipeline":
        """Build from a preset name/path or an already-loaded preset config. ``weightless``: as
        ``from_pretrained``'s, for presets that load files (a random preset is built whole: its weights are drawn
        in turn, so skipping one part would change the next)."""
        cfg = load_preset(preset, overrides) if isinstance(preset, str) else preset
        # runtime: device, dtype, cpu_offload, llm_quantization; checked before anything loads.
        rt = runtime_options(cfg.get("runtime", {}) or {})
        device, dtype = rt.device, rt.dtype
        low_vram = rt.cpu_offload or rt.llm_quantization is not None
        check_weightless(weightless, device, placed=low_vram or rt.detokenizer_device is not None)
        settings = GenerationSettings.from_config(cfg.get("generation", {}))
        source = cfg.get("source", "random")
        if source == "random":
            # Built where it will run, in its dtype: a full-size random model never exists in fp32 on the CPU.
            home = torch.device("cpu") if low_vram else device
            with torch.device(home), _default_dtype(dtype if dtype in (torch.float16, torch.bfloat16) else None):
                pipe = _build_random(cfg, settings)
            pipe = pipe.to(home, dtype)
        elif source == "pretrained":
            pipe = cls.from_pretrained(resolve_path(cfg.path), device="cpu" if low_vram else device,
                                       torch_dtype=dtype, weightless=weightless)
            if cfg.get("generation"):  # the preset's (or --set's) values over the folder's own, key by key
                from omegaconf import OmegaConf

                pipe.settings = pipe.settings.replace(**OmegaConf.to_container(cfg.generation, resolve=True))
        elif source == "release":
            from .checkpoints.release import load_release_pipeline

            # (placed per cfg.runtime)
            pipe = load_release_pipeline(cfg, device=device, dtype=dtype, weightless=weightless)
            pipe.settings = settings
        else:
            raise PresetError(f"unknown preset source {source!r} (random, pretrained or release)")
        if source != "release" and (low_vram or rt.detokenizer_device is not None):
            pipe.place(device, cpu_offload=rt.cpu_offload, llm_quantization=rt.llm_quantization,
                       detokenizer_device=rt.detokenizer_device)
        pipe.name = cfg.get("name", pipe.name)
        return pipe


def check_weightless(names: Collection[str], device: torch.device, placed: bool = False) -> None:
    """Raise unless ``names`` are components that can load without weights on ``device`` (``placed``: the runtime
    asks for offload, quantization or a de-tokenizer device, which move weights)."""
    unknown = sorted(set(names) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"no component {', '.join(unknown)} (there are {', '.join(COMPONENTS)})")
    if names and (device.type != "cpu" or placed):
        raise ValueError("weightless components load on the CPU only, without offload, quantization or a "
                         "de-tokenizer device")


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]):
    """Make new floating-point tensors ``dtype`` inside the block (nothing changes with None)."""
    if dtype is None:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _build_random(cfg, settings: GenerationSettings) -> SeedStoryPipeline:
    """Random-init components of the sizes in the preset (for tests and benchmarks)."""
    from omegaconf import OmegaConf

    from .tokens import build_byte_tokenizer

    c = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(int(c.get("init_seed", 0)))
    n_img = int(c.get("num_img_tokens", 64))
    tok_cfg = c.get("tokenizer", {"type": "byte"})
    if tok_cfg.get("type") == "byte":
        tokenizer = build_byte_tokenizer(n_img)
    else:
        from .tokens import load_tokenizer

        tokenizer = load_tokenizer(resolve_path(tok_cfg["path"]), n_img)
    vit = QwenVisionTransformer(**c["visual_tokenizer"])
    agent_cfg = dict(c["agent"])
    llm_cfg = dict(agent_cfg["llm"])
    llm_cfg.setdefault("vocab_size", len(tokenizer))
    llm_cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
    llm_cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    llm_cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
    agent_cfg["llm"] = llm_cfg
    agent = SeedStoryAgent.from_config(agent_cfg)
    detok = Detokenizer.from_config(c["detokenizer"])
    return SeedStoryPipeline(tokenizer, vit, agent, detok, settings, name=c.get("name", "random"))
