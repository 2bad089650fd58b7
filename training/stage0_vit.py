"""Stage 0b (small models from scratch only): teach the visual tokenizer to see.

The release borrows Qwen-VL's trained ViT; a small demo model has none. Learning it only through the
de-tokenizer's denoising loss (stage 1 with ``train_visual_tokenizer``) lets it collapse: the UNet can
lower its loss by drawing the average frame, and the features stop depending on the image. Here the ViT
learns first, from a direct objective: a linear read-out of its features must redraw the frame at low
resolution (``target_size``, default 32 px), so every feature carries what is where (characters by
colour and shape, setting, props, layout). The read-out is thrown away; stage 1 then trains the
de-tokenizer on the frozen features (``train_visual_tokenizer: false``), as the release did.

    accelerate launch -m training.stage0_vit --config configs/train/<...>.yaml [--resume]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


from .common import (
    count_parameters, export, image_loader, prepare_training, resume, start_stage, train_loop, unwrap_trained,
)


class ReadoutObjective(nn.Module):
    """MSE between a linear read-out of the ViT features and the frame at ``target_size`` px."""

    def __init__(self, vit: nn.Module, n_queries: int, dim: int, target_size: int):
        super().__init__()
        self.vit, self.target_size = vit, target_size
        self.readout = nn.Linear(n_queries * dim, 3 * target_size * target_size)

    def forward(self, pixel_values: torch.Tensor, images: torch.Tensor) -> dict:
        features = self.vit(pixel_values)  # [B, n_queries, dim]
        pred = self.readout(features.flatten(1).float()).view(-1, 3, self.target_size, self.target_size)
        target = F.interpolate(images.float(), size=(self.target_size, self.target_size), mode="area")
        loss = F.mse_loss(pred, target)
        return {"loss": loss, "feature_spread": features.detach().float().std(dim=0).mean()}


def main(argv=None) -> str:
    args, cfg, acc, out, pipe = start_stage(__doc__, argv, trains=["visual_tokenizer"], unused=["agent", "detokenizer"])
    t, d = cfg.train, cfg.data
    vit = pipe.visual_tokenizer.train()
    vit.requires_grad_(True)
    model = ReadoutObjective(vit, vit.config.n_queries, vit.config.output_dim, int(t.get("target_size", 32)))
    acc.print(f"visual tokenizer + read-out: {count_parameters(model)}")
    resolution = int(d.get("resolution") or pipe.detokenizer.default_size[0])
    loader = image_loader(cfg, pipe, acc, resolution)
    model, optimizer, scheduler, shell = prepare_training(acc, model, t)
    start = resume(acc, out) if args.resume else 0

    def losses(batch):
        return model(batch["pixel_values"].to(acc.device), batch["sd_pixel_values"].to(acc.device))

    train_loop(acc, model, optimizer, scheduler, loader, cfg, out, "stage0_vit", start, losses)
    pipe.visual_tokenizer = unwrap_trained(acc, model, shell).vit.eval()
    path = export(acc, pipe, out)
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
