"""Qwen-VL style resampler: learned queries cross-attend to a grid of features.

Used three times in SEED-Story: as the attention pool of the visual tokenizer (1024 patches -> 256
tokens), as the agent's input resampler (256 ViT tokens -> 64 LLM slots) and as its output resampler
(64 hidden states -> 256 ViT-space tokens). Parameter names match the released checkpoints:
``pos_embed``, ``query``, ``kv_proj`` (only when kv_dim != embed_dim), ``attn.*``, ``ln_q``, ``ln_kv``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def resize_pos_table(pos: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Bicubically resize a square positional table [L, C] to [num_positions, C] (computed in fp32)."""
    src = int(math.sqrt(pos.shape[0]))
    tgt = int(math.sqrt(num_positions))
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE-style 2D sin-cos table [grid_size**2, embed_dim] (first half encodes rows, second half columns)."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=1)
    return torch.from_numpy(emb).to(torch.get_default_dtype())  # a model built in bf16 gets a bf16 table


class QwenResampler(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        grid_size: int = 8,
        embed_dim: int = 4096,
        num_heads: int = 32,
        kv_dim: Optional[int] = None,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.num_queries = grid_size**2
        self.embed_dim = embed_dim
        # A fixed table, but stored in the checkpoints, so kept as a frozen parameter.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim and kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, kv_dim] -> [B, num_queries, embed_dim]
        key_pos = resize_pos_table(self.pos_embed, x.shape[1])  # [L, D]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, B, D]
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)  # [Q, B, D]
        out = self.attn(q + self.pos_embed.unsqueeze(1), x + key_pos.unsqueeze(1), x, need_weights=False)[0]
        return out.permute(1, 0, 2)
