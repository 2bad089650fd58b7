"""A plain KV-cache value and one decoder call that works across transformers versions.

Our cache is a tuple over layers of ``(key, value)`` tensors [B, heads, T, head_dim]. It is never
mutated in place (every step builds new tensors), so a reference to it is a free snapshot: the story
engine keeps one per frame and branches from any of them.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Optional

import torch
from transformers import DynamicCache

KV = tuple  # tuple[tuple[torch.Tensor, torch.Tensor], ...]


def kv_length(kv: Optional[KV]) -> int:
    return 0 if not kv else kv[0][0].shape[-2]


def kv_nbytes(kv: Optional[KV]) -> int:
    return sum(t.numel() * t.element_size() for layer in (kv or ()) for t in layer)


def kv_select(kv: KV, index: torch.Tensor | list[int] | slice) -> KV:
    """Keep the given positions of every layer (used for windows and attention sinks)."""
    if isinstance(index, list):
        index = torch.tensor(index, dtype=torch.long, device=kv[0][0].device)
    return tuple((k[:, :, index], v[:, :, index]) for k, v in kv)


def _to_hf(kv: Optional[KV]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv or ()):
        cache.update(k, v, i)
    return cache


def _from_hf(cache) -> KV:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return tuple((layer.keys, layer.values) for layer in cache.layers)
    return tuple(zip(cache.key_cache, cache.value_cache))


@lru_cache(maxsize=None)
def _cache_kwarg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def run_decoder(
    llm, inputs_embeds: torch.Tensor, kv: Optional[KV] = None, position_ids: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, KV]:
    """Run the LM's decoder stack on new positions after ``kv``.

    inputs_embeds: [B, L, H]. Returns the final post-norm hidden states [B, L, H] and the extended cache.
    Positions default to ``kv_length(kv) + arange(L)``.
    """
    decoder = llm.get_decoder()
    start = kv_length(kv)
    if position_ids is None:
        position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
    cache = _to_hf(kv)
    out = decoder(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_kwarg(type(decoder)): cache},
    )
    return out.last_hidden_state, _from_hf(cache)
