"""The visual tokenizer: Qwen-VL's ViT (ViT-bigG at release size) with an attention pool.

image [B, 3, S, S] -> patches [B, (S/p)^2, width] -> pre-LN transformer -> attention pool to
``n_queries`` tokens -> ``ln_post`` -> ``@ proj`` -> features [B, n_queries, output_dim].
Parameter names match ``qwen_vit_G.pt`` (a plain ``transformer.visual`` state dict of Qwen-VL-Chat).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .qwen_resampler import QwenResampler, resize_pos_table


class VisualAttention(nn.Module):
    """Self-attention whose fused ``in_proj`` is laid out head-major: for head h, rows
    [h*3*d : h*3*d + d] are q, the next d are k, the next d are v (Megatron style)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # [B, N, C]
        qkv = self.in_proj(x).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B, N, H, d]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualAttentionBlock(width, heads, mlp_width, eps) for _ in range(layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class QwenVisionTransformer(ModelMixin, ConfigMixin):
    """The visual tokenizer. ``forward(pixel_values)`` -> features [B, n_queries, output_dim]."""

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["VisualAttentionBlock"]  # a block stays on one device / in one FSDP unit

    @register_to_config
    def __init__(
        self,
        image_size: int = 448,
        patch_size: int = 14,
        width: int = 1664,
        layers: int = 48,
        heads: int = 16,
        mlp_width: int = 8192,
        n_queries: int = 256,
        output_dim: int = 4096,
        pool_heads: Optional[int] = None,
        pos_table_size: int = 256,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        # A 16x16 table at release size, bicubically resized to the patch grid on every call.
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(pos_table_size, width))
        self.ln_pre = nn.LayerNorm(width, eps=layer_norm_eps)
        self.transformer = VisualTransformer(width, layers, heads, mlp_width, layer_norm_eps)
        self.attn_pool = QwenResampler(
            grid_size=int(math.isqrt(n_queries)),
            embed_dim=output_dim,
            num_heads=pool_heads or max(1, output_dim // 128),
            kv_dim=width,
            layer_norm_eps=layer_norm_eps,
        )
        self.ln_post = nn.LayerNorm(output_dim, eps=layer_norm_eps)
        self.proj = nn.Parameter(output_dim**-0.5 * torch.randn(output_dim, output_dim))

    def _set_gradient_checkpointing(self, module=None, value=True, **kwargs):
        self.transformer.gradient_checkpointing = value

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid^2, width]
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))  # [B, n_queries, output_dim]
        return x @ self.proj

    @torch.no_grad()
    def unconditional_features(self, batch_size: int = 1) -> torch.Tensor:
        """Features of an all-zero *normalized* image: the de-tokenizer's negative (CFG) condition."""
        s = self.config.image_size
        zeros = torch.zeros(batch_size, 3, s, s, device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        return self(zeros)
