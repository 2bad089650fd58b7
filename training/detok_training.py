"""The de-tokenizer objective shared by stages 1 and 3: DDPM epsilon-prediction MSE on VAE latents,
conditioned on ViT-space features through the XL resampler (docs/formats.md §6)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seedstory.models.detokenizer import Detokenizer
from seedstory.models.qwen_vit import QwenVisionTransformer


def set_detokenizer_trainable(detok: Detokenizer, unet_params: str) -> None:
    """The resampler always; of the UNet, ``attn_kv`` (the release: every attention's to_k/to_v),
    ``full``, or ``none``. The VAE never."""
    detok.requires_grad_(False)
    detok.resampler.requires_grad_(True)
    if unet_params == "full":
        detok.unet.requires_grad_(True)
    elif unet_params == "attn_kv":
        for name, module in detok.unet.named_modules():
            if name.endswith(("to_k", "to_v")):
                module.requires_grad_(True)
    elif unet_params != "none":
        raise ValueError(f"train.unet_params must be attn_kv, full or none, not {unet_params!r}")


class DenoisingObjective(nn.Module):
    """Everything trained in stage 1/3 behind one forward, so accelerate prepares a single model.

    ``visual_tokenizer`` is given only when it is trained jointly (small models from scratch); otherwise
    features are computed outside under no_grad. ``snr_gamma`` > 0 (``train.snr_gamma``) weights each
    sample by Min-SNR-gamma under ``noise_scheduler``; 0 is plain MSE."""

    def __init__(self, detokenizer: Detokenizer, visual_tokenizer: Optional[QwenVisionTransformer] = None,
                 noise_scheduler=None, snr_gamma: float = 0.0):
        super().__init__()
        if snr_gamma > 0 and noise_scheduler is None:
            raise ValueError("snr_gamma needs the noise scheduler")
        self.detokenizer = detokenizer
        self.visual_tokenizer = visual_tokenizer
        self.noise_scheduler, self.snr_gamma = noise_scheduler, float(snr_gamma)

    def forward(self, sd_pixel_values, generators: list[torch.Generator], time_ids, features=None, pixel_values=None,
                draws: int = 1):
        """The loss of one batch: its pictures VAE-encoded and noised (``noisy_latents``: ``draws`` noisings each)
        inside the forward, where FSDP gathers the VAE's weights like the rest, then denoised. ``time_ids`` and
        ``features`` / ``pixel_values`` come already repeated for the draws."""
        # The VAE stays fp32 under autocast (accelerate's mixed precision with DDP or one process; in fp16 the SDXL
        # VAE's activations overflow). FSDP 2's and DeepSpeed's mixed precision cast the module itself: there it
        # runs in their dtype (bf16 keeps fp32's range).
        with torch.autocast(sd_pixel_values.device.type, enabled=False):
            latents, timesteps, noise = noisy_latents(self.detokenizer.vae, self.noise_scheduler, sd_pixel_values,
                                                      generators, draws=draws)
        if features is None:
            features = self.visual_tokenizer(pixel_values)
        return self.denoising_loss(latents, timesteps, noise, time_ids, features)

    def denoising_loss(self, noisy_latents, timesteps, noise, time_ids, features):
        pred = self.detokenizer(noisy_latents, timesteps, features, time_ids)
        weights = min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)
        if weights is None:
            return F.mse_loss(pred.float(), noise.float())
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
        return (per_sample * weights).mean()


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> Optional[torch.Tensor]:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023; diffusers' ``--snr_gamma``):
    min(SNR(t), gamma) / SNR(t). Nearly clean timesteps, where the picture needs no condition to be
    denoised, stop dominating the gradient, so the condition pathway learns sooner. None when gamma <= 0."""
    if gamma <= 0:
        return None
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()  # [B]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def repeat_draws(x: torch.Tensor, draws: int) -> torch.Tensor:
    """``x`` [B, ...] -> [draws * B, ...], in the order ``noisy_latents`` repeats the latents."""
    return x if draws <= 1 else x.repeat(draws, *([1] * (x.dim() - 1)))


def sample_generators(batch: dict) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by its place in the data stream (``batch["sample_seed"]``): a sample's
    crop, noise, timestep and dropout do not depend on which process or batch holds it, so N processes train what
    one process does with their whole batch, and a resumed run draws what the uninterrupted one did."""
    return [torch.Generator().manual_seed(int(s)) for s in batch["sample_seed"]]


def per_sample(generators: list[torch.Generator], draw, like: torch.Tensor) -> torch.Tensor:
    """``draw(generator)`` for each sample's generator, stacked along a new dim 1 and flattened into the batch
    dim: each draw's [m, ...] values become rows ``d * B + i``, the order ``repeat_draws`` gives ``m`` repeats of
    the batch. On ``like``'s device and dtype."""
    values = torch.stack([draw(g) for g in generators], dim=1)  # [m, B, ...]
    return values.reshape(-1, *values.shape[2:]).to(like.device, like.dtype)


def posterior_sample(dist, generators: list[torch.Generator]) -> torch.Tensor:
    """A sample of each image's VAE posterior (a diagonal Gaussian), drawn from the image's own generator."""
    shape = dist.mean.shape[1:]
    return dist.mean + dist.std * per_sample(generators, lambda g: torch.randn(1, *shape, generator=g), dist.mean)


def drop_condition(features: torch.Tensor, negative: torch.Tensor, p: float,
                   generators: list[torch.Generator]) -> torch.Tensor:
    """Replace each sample's features by ``negative`` (the zero-image features that inference uses as
    the classifier-free-guidance negative) with probability ``p``, so guidance > 1 has a trained
    unconditional branch to push away from. ``features`` holds m repeats of the generators' batch."""
    if p <= 0:
        return features
    m = features.shape[0] // len(generators)
    drop = per_sample(generators, lambda g: torch.rand(m, generator=g), features) < p  # [m * B]
    return torch.where(drop[:, None, None], negative.to(features.dtype).expand_as(features), features)


@torch.no_grad()
def noisy_latents(vae, noise_scheduler, sd_pixel_values: torch.Tensor, generators: list[torch.Generator],
                  draws: int = 1):
    """VAE-encode images in [-1, 1] (a sample of each posterior), add DDPM noise at uniformly drawn timesteps,
    every draw from the sample's own generator. ``draws`` > 1 noises each encoded image that many times
    (independent noise and timestep; the batch is repeated, ``repeat_draws`` does the same to the conditions): on
    a CPU the VAE encoder costs as much as the small UNet's forward and backward, so reusing each encoding buys
    UNet samples cheaply."""
    dist = vae.encode(sd_pixel_values.to(vae.dtype)).latent_dist
    shape = dist.mean.shape[1:]
    latents = repeat_draws(posterior_sample(dist, generators) * vae.config.scaling_factor, draws)
    noise = per_sample(generators, lambda g: torch.randn(draws, *shape, generator=g), latents)
    total = noise_scheduler.config.num_train_timesteps
    t = per_sample(generators, lambda g: torch.randint(0, total, (draws,), generator=g),
                   torch.empty(0, dtype=torch.long, device=latents.device))
    return noise_scheduler.add_noise(latents, noise, t), t, noise
