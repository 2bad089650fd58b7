"""Stage 1: de-tokenizer pre-training: reconstruct images from visual-tokenizer features.

Trains the XL resampler and the UNet's attention k/v as the release did (``train.unet_params:
attn_kv``) or the whole UNet (``full``, small models). With ``train.train_visual_tokenizer: true`` the
visual tokenizer learns jointly from the same loss: how a small model trained from scratch gets
features that let the de-tokenizer redraw characters, setting and layout. ``train.condition_dropout``
(default 0) trains the unconditional branch that classifier-free guidance needs: that share of samples is
conditioned on the zero-image features, inference's negative. ``train.snr_gamma`` (default 0: plain MSE)
weights the loss by Min-SNR-gamma, which makes the de-tokenizer learn to follow its condition sooner.
``train.noise_draws`` (default 1) noises each VAE-encoded image that many times per step; ``train.ema_decay``
(default 0: off) exports an exponential moving average of the weights.

    accelerate launch -m training.stage1_detokenizer --config configs/train/<...>.yaml [--resume]
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler


from .common import (
    count_parameters, export, frozen_features, image_loader, make_weight_average, prepare_training, resume,
    start_stage, train_loop, unwrap_trained,
)
from .detok_training import (
    DenoisingObjective, drop_condition, per_sample, repeat_draws, sample_generators,
    set_detokenizer_trainable,
)


def trained_parts(cfg) -> list[str]:
    return ["detokenizer", "visual_tokenizer"] if cfg.train.get("train_visual_tokenizer", False) else ["detokenizer"]


def main(argv=None) -> str:
    args, cfg, acc, out, pipe = start_stage(__doc__, argv, trains=trained_parts, unused=["agent"])
    t, d = cfg.train, cfg.data
    vit, detok = pipe.visual_tokenizer, pipe.detokenizer
    set_detokenizer_trainable(detok, t.get("unet_params", "attn_kv"))
    joint = "visual_tokenizer" in trained_parts(cfg)
    vit.requires_grad_(joint)
    noise_scheduler = DDPMScheduler.from_config(detok.scheduler.config)
    model = DenoisingObjective(detok, vit if joint else None, noise_scheduler, float(t.get("snr_gamma", 0.0)))
    if not joint:
        vit.eval().to(acc.device)
        with torch.no_grad():
            negative = vit.unconditional_features()  # the frozen ViT's guidance negative: the same every step
    detok.vae.eval()  # frozen: the objective encodes the pictures with it
    acc.print(f"trained: {count_parameters(model)}")
    resolution = int(d.get("resolution") or detok.default_size[0])
    loader = image_loader(cfg, pipe, acc, resolution, random_crop=bool(d.get("random_crop", False)))
    model, optimizer, scheduler, shell = prepare_training(acc, model, t)
    average = make_weight_average(acc, model, t)
    start = resume(acc, out) if args.resume else 0
    dropout = float(t.get("condition_dropout", 0.0))
    draws = int(t.get("noise_draws", 1))

    def losses(batch):
        generators = sample_generators(batch)
        sd_pixels = batch["sd_pixel_values"].to(acc.device)
        pixels = batch["pixel_values"].to(acc.device)
        time_ids = repeat_draws(batch["time_ids"].to(acc.device), draws)
        if joint:
            pixels = repeat_draws(pixels, draws)
            # the negative is the features of an all-zero normalized image: drop by zeroing the pixels
            keep = per_sample(generators, lambda g: torch.rand(draws, generator=g), pixels) >= dropout
            keep = keep.to(pixels.dtype)
            pixels = pixels * keep[:, None, None, None] if dropout > 0 else pixels
            return {"loss": model(sd_pixels, generators, time_ids, pixel_values=pixels, draws=draws)}
        with torch.no_grad():
            features = repeat_draws(frozen_features(vit, pixels), draws)  # encoded once per image, like the latents
            if dropout > 0:
                features = drop_condition(features, negative, dropout, generators)
        return {"loss": model(sd_pixels, generators, time_ids, features=features, draws=draws)}

    train_loop(acc, model, optimizer, scheduler, loader, cfg, out, "stage1_detokenizer", start, losses, average)
    trained = unwrap_trained(acc, model, shell)
    pipe.detokenizer = trained.detokenizer.eval()
    if joint:
        pipe.visual_tokenizer = trained.visual_tokenizer.eval()
    path = export(acc, pipe, out)
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
