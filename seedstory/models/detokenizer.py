"""The de-tokenizer: ViT-space image features -> pixels, through an SDXL UNet conditioned on them.

``ResamplerXL`` turns features [B, N, D] into SDXL conditioning (``prompt_embeds`` [B, Q, o1+o2] and
``pooled`` [B, o2]); a stock diffusers ``StableDiffusionXLPipeline`` (no text encoders) does the rest.

Release checkpoints hold only ``resampler.*`` and ``unet.*`` keys (``Detokenizer.release_prefixes``);
the VAE and scheduler come from SDXL-base. Use ``release_state_dict()`` to get that subset.
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from ..quiet import no_fallback_notice

with no_fallback_notice():
    from diffusers import StableDiffusionXLPipeline

from .resampler_xl import ResamplerXL

# name -> (scheduler class, overrides applied on top of the construction scheduler's config)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# The release's sampler (SDXL-base scheduler config).
RELEASE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    prediction_type="epsilon",
)

# Toy sizes: 64x64 output (latent 16 x VAE factor 4), a fraction of a second per image on CPU.
TINY_DETOKENIZER_CONFIG: dict[str, dict[str, Any]] = {
    "resampler": dict(dim=32, depth=1, dim_head=8, heads=4, num_queries=16, embedding_dim=64,
                      output1_dim=16, output2_dim=32),
    "unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        transformer_layers_per_block=1,
        cross_attention_dim=16 + 32,  # output1_dim + output2_dim
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # output2_dim + 6 time ids * addition_time_embed_dim
        norm_num_groups=32,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    ),
    "scheduler": dict(RELEASE_SCHEDULER_CONFIG),
}

SeedArg = Union[int, Sequence[int], None]


def _scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if type(cls).__name__ == "DummyObject":  # diffusers' placeholder when an optional dependency is missing
        raise ValueError(f"scheduler {name!r} needs an optional dependency that is not installed (e.g. scipy)")
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{name!r} is not a diffusers scheduler class")
    return cls


class Detokenizer(nn.Module):
    """Resampler + SDXL UNet (+ VAE and scheduler for sampling).

    ``state_dict()`` keys ``resampler.*`` / ``unet.*`` match the release; ``vae.*`` keys are ours only.
    The VAE stays in fp32 whatever the other parts' dtype (``to``, ``from_pretrained``), as the release keeps it:
    SDXL's VAE overflows in fp16. The UNet's latents are cast to it on their way in.
    """

    release_prefixes = ("resampler.", "unet.")

    def __init__(self, resampler: ResamplerXL, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin):
        super().__init__()
        self.resampler = resampler
        self.unet = unet
        self.vae = vae.float()  # (not ``to``: diffusers warns on every ModelMixin.to with a dtype)
        # diffusers' SDXL pipeline hands the VAE latents in the UNet's dtype (it upcasts only fp16 VAEs itself)
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(lambda module, args: (args[0].to(torch.float32), *args[1:]))
        self.scheduler = scheduler  # plain attribute: not a module
        self._scheduler_cache: dict[str, SchedulerMixin] = {}
        self._pipe: Optional[StableDiffusionXLPipeline] = None

    def to(self, *args, **kwargs) -> "Detokenizer":
        super().to(*args, **kwargs)
        self.vae.float()
        return self

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: UNet ``sample_size`` times the VAE scale factor."""
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def pipeline(self) -> StableDiffusionXLPipeline:
        """The SDXL pipeline over our components, built once (rebuilt only if unet/vae were replaced)."""
        p = self._pipe
        if p is None or p.unet is not self.unet or p.vae is not self.vae:
            p = StableDiffusionXLPipeline(
                vae=self.vae, unet=self.unet, scheduler=self.scheduler,
                text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                add_watermarker=False,  # else on whenever invisible-watermark happens to be installed
            )
            p.set_progress_bar_config(disable=True)
            self._pipe = p
        return p

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The subset of ``state_dict()`` a release checkpoint holds (``resampler.*``, ``unet.*``)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.release_prefixes)}

    # -- conditioning / training ---------------------------------------------------------------
    def encode_condition(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, N, D] -> (prompt_embeds [B, Q, o1+o2], pooled [B, o2])."""
        p = self.resampler.latents
        return self.resampler(features.to(device=p.device, dtype=p.dtype))

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, features: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        """Training path: latents [B, C, h, w], timesteps [B], features [B, N, D], time_ids [B, 6]
        -> noise prediction [B, C, h, w]."""
        prompt_embeds, pooled = self.encode_condition(features)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(noisy_latents, timesteps, prompt_embeds, added_cond_kwargs=added).sample

    # -- sampling --------------------------------------------------------------------------------
    def get_scheduler(self, scheduler: Union[str, SchedulerMixin, None] = None) -> SchedulerMixin:
        """``None``: the construction scheduler; a name from ``SCHEDULERS`` or a diffusers scheduler
        class name: built from the construction scheduler's config (cached); an instance: itself."""
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, SchedulerMixin):
            return scheduler
        if scheduler not in self._scheduler_cache:
            if scheduler in SCHEDULERS:
                cls, extra = SCHEDULERS[scheduler]
            else:
                try:
                    cls, extra = _scheduler_class(scheduler), {}
                except ValueError as e:
                    raise ValueError(
                        f"unknown scheduler {scheduler!r} ({e}); valid names: {', '.join(SCHEDULERS)}, "
                        "or a diffusers scheduler class name such as 'HeunDiscreteScheduler'"
                    ) from None
            self._scheduler_cache[scheduler] = cls.from_config(self.scheduler.config, **extra)
        return self._scheduler_cache[scheduler]

    def _generators(self, seed: SeedArg, batch: int) -> Optional[list[torch.Generator]]:
        if seed is None:
            return None
        seeds = [int(seed)] * batch if isinstance(seed, numbers.Integral) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
        # One fresh generator per image, as the reference does per call: an image depends only on
        # its own seed and condition, not on its position in the batch.
        return [torch.Generator(self.device).manual_seed(s) for s in seeds]

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        negative_features: Optional[torch.Tensor] = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: SeedArg = 42,
        scheduler: Union[str, SchedulerMixin, None] = None,
        output_type: str = "pil",
        callback: Optional[Callable[[int, int], None]] = None,
    ):
        """features [B, N, D] (negative_features [1 or B, N, D], needed when guidance_scale > 1)
        -> B images: a list of PIL images, or per ``output_type`` ("np", "pt", "latent") arrays/tensors.

        ``seed``: int (same for every image), list of B ints, or None (unseeded).
        ``callback(step, total_steps)`` is called after each denoising step (step counts from 1).
        """
        if features.dim() != 3:
            raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
        batch = features.shape[0]
        cfg = guidance_scale > 1
        if cfg:
            if negative_features is None:
                raise ValueError(
                    f"guidance_scale={guidance_scale} > 1 needs negative_features (the unconditional features, "
                    "e.g. visual_tokenizer.unconditional_features()); or pass guidance_scale=1"
                )
            if negative_features.dim() != 3 or negative_features.shape[0] not in (1, batch):
                raise ValueError(
                    f"negative_features must be [1 or {batch}, N, D], got {tuple(negative_features.shape)}"
                )
            # One resampler call over [positive; negative], as the reference does.
            embeds, pooled = self.encode_condition(torch.cat([features, negative_features.to(features)], dim=0))
            embeds, neg_embeds = embeds[:batch], embeds[batch:].expand(batch, -1, -1)
            pooled, neg_pooled = pooled[:batch], pooled[batch:].expand(batch, -1)
        else:
            embeds, pooled = self.encode_condition(features)
            neg_embeds = neg_pooled = None

        default_h, default_w = self.default_size
        pipe = self.pipeline
        pipe.scheduler = self.get_scheduler(scheduler)

        step_end = None
        if callback is not None:
            def step_end(p, i, t, kwargs):
                callback(i + 1, p.num_timesteps)
                return {}

        with warnings.catch_warnings():
            # fp16 VAEs with force_upcast are decoded in fp32 via the pipeline's deprecated upcast_vae.
            warnings.filterwarnings("ignore", message=".*upcast_vae.*")
            out = pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=neg_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height or default_h,
                width=width or default_w,
                generator=self._generators(seed, batch),
                output_type=output_type,
                callback_on_step_end=step_end,
            )
        return out.images

    # -- construction / persistence ----------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "Detokenizer":
        """Random-init components from a plain dict with keys ``resampler`` (ResamplerXL kwargs), ``unet``
        (UNet2DConditionModel kwargs), ``vae`` (AutoencoderKL kwargs) and ``scheduler`` (scheduler kwargs;
        an optional ``_class_name`` picks a diffusers scheduler class, default EulerDiscreteScheduler)."""
        config = {k: dict(v) for k, v in dict(config).items()}
        sched_cfg = config.get("scheduler", dict(RELEASE_SCHEDULER_CONFIG))
        sched_cls = _scheduler_class(sched_cfg.pop("_class_name", "EulerDiscreteScheduler"))
        with torch.device("cpu"):  # a scheduler's tables live on the CPU, wherever the modules are built
            scheduler = sched_cls(**sched_cfg)
        return cls(
            resampler=ResamplerXL(**config["resampler"]),
            unet=UNet2DConditionModel(**config["unet"]),
            vae=AutoencoderKL(**config["vae"]),
            scheduler=scheduler,
        )

    def save_pretrained(self, path: str) -> None:
        """Write ``resampler/``, ``unet/``, ``vae/`` (safetensors + config.json) and ``scheduler/``."""
        os.makedirs(path, exist_ok=True)
        for name in ("resampler", "unet", "vae"):
            getattr(self, name).save_pretrained(os.path.join(path, name), safe_serialization=True)
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))

    @classmethod
    def from_pretrained(
        cls, path: str, torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
        weightless: bool = False,
    ) -> "Detokenizer":
        """Load a directory written by ``save_pretrained`` (local files only). ``weightless``: the structure alone,
        no weights read (``checkpoints.validation.without_weights``)."""
        from ..checkpoints.validation import from_folder

        missing = [d for d in ("resampler", "unet", "vae", "scheduler") if not os.path.isdir(os.path.join(path, d))]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved Detokenizer (missing {', '.join(missing)}/)")
        if weightless and device is not None:
            raise ValueError("a weightless de-tokenizer stays where it is built (its parameters cannot be moved)")

        def part(model_cls, name: str, dtype: Optional[torch.dtype]):
            return from_folder(model_cls, os.path.join(path, name), dtype, weightless, local_files_only=True)

        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            sched_cls = _scheduler_class(json.load(f)["_class_name"])
        model = cls(
            resampler=part(ResamplerXL, "resampler", torch_dtype),
            unet=part(UNet2DConditionModel, "unet", torch_dtype),
            vae=part(AutoencoderKL, "vae", None),  # fp32 in __init__
            scheduler=sched_cls.from_pretrained(os.path.join(path, "scheduler"), local_files_only=True),
        )
        return model.to(device) if device is not None else model
