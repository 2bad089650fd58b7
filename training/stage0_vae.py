"""Stage 0 (small models from scratch only): train the de-tokenizer's VAE on the story images.

The release uses SDXL's VAE as is; a small demo model has no such thing to borrow, so it learns its own
autoencoder first: L1 (+ optionally MSE) reconstruction with a small KL term, optionally weighted towards
small details, on random crops (the
VAE is fully convolutional, so it is trained on crops and used on whole frames). The rest of the
pipeline is copied through unchanged and exported with the new VAE.

    accelerate launch -m training.stage0_vae --config configs/train/<...>.yaml [--resume]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    count_parameters, export, image_loader, prepare_training, resume, start_stage, train_loop, unwrap_trained,
)
from .detok_training import posterior_sample, sample_generators


def detail_weights(images: torch.Tensor, strength: float, size: int = 9) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + strength * |pixel - mean of its size x size neighbourhood|
    (averaged over channels), scaled to mean 1 over the batch. Flat areas (sky, ground) weigh about 1; a
    small thing unlike its surroundings (an accessory, a held prop) weighs more over its whole area, a
    large one only along its outline."""
    x = images.float()
    local = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
    w = 1 + strength * (x - local).abs().mean(1, keepdim=True)
    return w / w.mean()


class AutoencoderObjective(nn.Module):
    """reconstruction L1 + mse_weight * MSE + kl_weight * KL(q(z|x) || N(0, I)), per element; with
    detail_weight > 0 both reconstruction terms are weighted per pixel by ``detail_weights``.

    L1 pushes every wrong pixel equally hard, so a few badly wrong pixels (a small accessory drawn in the
    body's colour) weigh no more than many slightly wrong ones; the squared term pushes in proportion to the
    error, and the detail weights push hardest where the picture's small things are."""

    def __init__(self, vae, kl_weight: float, mse_weight: float = 0.0, detail_weight: float = 0.0):
        super().__init__()
        self.vae, self.kl_weight, self.mse_weight, self.detail_weight = vae, kl_weight, mse_weight, detail_weight

    def forward(self, images: torch.Tensor, generators: Optional[list] = None) -> dict:
        """``generators``: one per image for the posterior's sample (its own draw, in any batch); None: the
        global torch RNG."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if generators is None else posterior_sample(posterior, generators)
        recon = self.vae.decode(z).sample
        error = recon.float() - images.float()
        w = detail_weights(images, self.detail_weight) if self.detail_weight else 1.0
        l1 = (error.abs() * w).mean()
        mse = (error.square() * w).mean()
        kl = posterior.kl().mean() / images[0].numel()
        return {"loss": l1 + self.mse_weight * mse + self.kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


def random_crops(images: torch.Tensor, size: int, generators: list[torch.Generator]) -> torch.Tensor:
    """One random ``size`` crop per image, drawn from its own generator (the whole image when it is not larger)."""
    _, _, h, w = images.shape
    if h <= size and w <= size:
        return images
    corners = [(int(torch.randint(0, h - size + 1, (1,), generator=g)), int(torch.randint(0, w - size + 1, (1,),
                                                                                               generator=g)))
               for g in generators]
    return torch.stack([im[:, t:t + size, l:l + size] for im, (t, l) in zip(images, corners)])


@torch.no_grad()
def latent_std(vae, loader, batches: int, device) -> float:
    values = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        values.append(vae.encode(batch["sd_pixel_values"].to(device)).latent_dist.sample().flatten().float().cpu())
    return float(torch.cat(values).std())


def main(argv=None) -> str:
    args, cfg, acc, out, pipe = start_stage(__doc__, argv, trains=["detokenizer"], unused=["visual_tokenizer", "agent"])
    t, d = cfg.train, cfg.data
    vae = pipe.detokenizer.vae
    vae.requires_grad_(True)
    model = AutoencoderObjective(vae, float(t.get("kl_weight", 1e-6)), float(t.get("mse_weight", 0.0)),
                                 float(t.get("detail_weight", 0.0)))
    acc.print(f"vae: {count_parameters(model)}")
    resolution = int(d.get("resolution") or pipe.detokenizer.default_size[0])
    loader = image_loader(cfg, pipe, acc, resolution)
    model, optimizer, scheduler, shell = prepare_training(acc, model, t)
    start = resume(acc, out) if args.resume else 0
    crop = int(d.get("crop") or resolution)

    def losses(batch):
        generators = sample_generators(batch)  # each picture's crop and latent sample are its own
        return model(random_crops(batch["sd_pixel_values"], crop, generators).to(acc.device), generators)

    train_loop(acc, model, optimizer, scheduler, loader, cfg, out, "stage0_vae", start, losses)
    vae = unwrap_trained(acc, model, shell).vae.eval()
    if t.get("set_scaling_factor", True) and acc.is_main_process:  # (what the main process exports)
        # As Stable Diffusion did: scale latents to unit variance, so the noise schedule means what it says.
        # (under FSDP and ZeRO-3 the gathered weights come back on the CPU, in the engine's dtype)
        std = latent_std(vae.to(acc.device, torch.float32), loader, int(t.get("scaling_batches", 8)), acc.device)
        vae.register_to_config(scaling_factor=1.0 / std)
        acc.print(f"latent std {std:.4f}: scaling_factor = {1.0 / std:.4f}")
    pipe.detokenizer.vae = vae
    path = export(acc, pipe, out)
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
