"""Stage 3: de-tokenizer adaptation: feed the stage-2 agent's regressed features (what it will
produce at story time) to the de-tokenizer and tune it on the story images.

For each story sample the frozen agent reads the context and regresses the target frame's features
(output resampler on the hidden states of its image slots); the de-tokenizer learns to paint the
target image from them.

    accelerate launch -m training.stage3_adapt --config configs/train/<...>.yaml [--resume]
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .common import (
    count_parameters, export, frozen_features, make_weight_average, prepare_training, resume, start_stage,
    train_loop, unwrap_trained,
)
from .detok_training import (
    DenoisingObjective, drop_condition, repeat_draws, sample_generators, set_detokenizer_trainable,
)
from .stage2_agent import BATCH_KEYS, build_data


def main(argv=None) -> str:
    args, cfg, acc, out, pipe = start_stage(__doc__, argv, trains=["detokenizer"])
    t, d = cfg.train, cfg.data
    vit, agent, detok = pipe.visual_tokenizer, pipe.agent, pipe.detokenizer
    for frozen in (vit, agent):
        frozen.requires_grad_(False).eval().to(acc.device)
    with torch.no_grad():
        negative = vit.unconditional_features()  # the frozen ViT's guidance negative: the same every step
    set_detokenizer_trainable(detok, t.get("unet_params", "attn_kv"))
    noise_scheduler = DDPMScheduler.from_config(detok.scheduler.config)
    model = DenoisingObjective(detok, None, noise_scheduler, float(t.get("snr_gamma", 0.0)))  # as in stage 1
    detok.vae.eval()  # frozen: the objective encodes the pictures with it
    acc.print(f"trained: {count_parameters(model)}")
    resolution = int(d.get("resolution") or detok.default_size[0])
    loader = build_data(cfg, pipe, acc, target_image_resolution=resolution)
    model, optimizer, scheduler, shell = prepare_training(acc, model, t)
    average = make_weight_average(acc, model, t)  # train.ema_decay, as in stage 1
    start = resume(acc, out) if args.resume else 0
    draws = int(t.get("noise_draws", 1))  # as in stage 1

    dropout = float(t.get("condition_dropout", 0.0))  # keep the guidance branch stage 1 trained, if any

    def losses(batch):
        generators = sample_generators(batch)
        with torch.no_grad():
            image_embeds = frozen_features(vit, batch["pixel_values"]).to(agent.dtype)
            regressed = agent(**{k: batch[k].to(acc.device) for k in BATCH_KEYS}, image_embeds=image_embeds,
                              return_recon_image_embeds=True)["recon_image_embeds"].float()
            if dropout > 0:
                regressed = drop_condition(regressed, negative, dropout, generators)
        return {"loss": model(batch["sd_pixel_values"].to(acc.device), generators,
                              repeat_draws(batch["time_ids"].to(acc.device), draws),
                              features=repeat_draws(regressed, draws), draws=draws)}

    train_loop(acc, model, optimizer, scheduler, loader, cfg, out, "stage3_adapt", start, losses, average)
    pipe.detokenizer = unwrap_trained(acc, model, shell).detokenizer.eval()
    path = export(acc, pipe, out)
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
