"""The de-tokenizer's Perceiver resampler ("ResamplerXL"): ViT-space features -> SDXL conditioning.

Output: ``prompt_embeds`` [B, num_queries, output1_dim + output2_dim] (the two SDXL text-encoder widths)
and ``pooled`` [B, output2_dim] from an attention pool. Parameter names match ``resampler.*`` in the
released de-tokenizer checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, Dh]

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n_lat, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # The release scales q and k by dh^-1/4 each and takes the softmax in fp32 for fp16's sake; SDPA's fused
        # kernels accumulate in fp32 themselves.
        out = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n_lat, -1)
        return self.to_out(out)


class AttentionPool(nn.Module):
    """CLIP-style attention pool: the mean token (plus positions) attends over all tokens."""

    def __init__(self, seq_len: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(1, 0, 2)  # [N, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False,
        )
        return out[0]  # [B, output_dim]


class ResamplerXL(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        dim: int = 1024,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 64,
        embedding_dim: int = 4096,
        output1_dim: int = 768,
        output2_dim: int = 1280,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)]
        )
        self.norm_out = nn.LayerNorm(dim)
        self.unet_proj_1 = nn.Linear(dim, output1_dim)
        self.unet_proj_2 = nn.Linear(dim, output2_dim)
        self.unet_attnpool = AttentionPool(num_queries, dim, heads, output2_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, N, embedding_dim]. The release normalizes over dim 1 (the token axis, per channel);
        # an odd choice, but the released weights were trained with it.
        x = self.proj_in(F.normalize(x, dim=1))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        hidden = self.norm_out(latents)  # [B, Q, dim]
        prompt_embeds = torch.cat([self.unet_proj_1(hidden), self.unet_proj_2(hidden)], dim=-1)
        return prompt_embeds, self.unet_attnpool(hidden)
