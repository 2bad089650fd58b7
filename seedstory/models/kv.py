"""A plain KV-cache value, an in-place workspace for decoding, and one decoder call for both.

Our cache value is a tuple over layers of ``(key, value)`` tensors [B, heads, T, head_dim]. It is never
mutated in place, so a reference to it is a free snapshot: the story engine keeps one per frame and
branches from any of them.

Decoding token by token goes through a ``KVWorkspace`` instead: a transformers ``Cache`` whose layers are
preallocated buffers written in place (``AppendLayer``), so a token costs the same whether the story is 200 or
2000 tokens long (a ``DynamicCache`` copies every layer's keys and values for each token). The value is copied
into it once; ``snapshot()`` gives the value back (views of the buffers, which later tokens do not touch).
"""
from __future__ import annotations

import functools
import inspect
from functools import lru_cache
from typing import Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

KV = tuple  # tuple[tuple[torch.Tensor, torch.Tensor], ...]


class KVParts(tuple):
    """A ``KV`` value kept as consecutive pieces (each a ``KV`` value): states that share a prefix share its
    pieces, and nothing is concatenated until a ``KVWorkspace`` copies them in, once."""


def kv_length(kv: Optional[KV]) -> int:
    if isinstance(kv, KVParts):
        return sum(kv_length(p) for p in kv)
    return 0 if not kv else kv[0][0].shape[-2]


def _tensors(kv):
    for piece in (kv if isinstance(kv, KVParts) else (kv,)):
        for layer in piece or ():
            yield from layer


def kv_nbytes(kv: Optional[KV]) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(kv))


def kv_storage_nbytes(values) -> int:
    """Bytes of memory that the ``KV`` values (or ``KVParts``) hold together, pieces they share counted once."""
    seen: dict[int, int] = {}
    for kv in values:
        for t in _tensors(kv):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def kv_concat(parts: KVParts) -> KV:
    """The pieces as one ``KV`` value."""
    pieces = [p for p in parts if p]
    if len(pieces) <= 1:
        return pieces[0] if pieces else ()
    return tuple((torch.cat([p[i][0] for p in pieces], dim=-2), torch.cat([p[i][1] for p in pieces], dim=-2))
                 for i in range(len(pieces[0])))


def kv_slice(kv: KV, start: int, end: int) -> KV:
    """Positions [start, end) of every layer, as tensors of their own (a view would keep the whole buffer)."""
    return tuple((k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in kv)


def kv_repeat(kv: Optional[KV | KVParts], n: int) -> Optional[KV | KVParts]:
    """The same cache as a batch of ``n`` rows (views, not copies: a ``KVWorkspace`` copies them in once)."""
    if n == 1 or not kv:
        return kv
    if isinstance(kv, KVParts):
        return KVParts(kv_repeat(piece, n) for piece in kv)
    return tuple((k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:])) for k, v in kv)


def kv_row(kv: KV, row: int, length: int) -> KV:
    """Row ``row`` of a batched cache, its first ``length`` positions (views)."""
    return tuple((k[row : row + 1, :, :length], v[row : row + 1, :, :length]) for k, v in kv)


def kv_select(kv: KV, index: torch.Tensor | list[int] | slice) -> KV:
    """Keep the given positions of every layer (used for windows and attention sinks)."""
    if isinstance(index, list):
        index = torch.tensor(index, dtype=torch.long, device=kv[0][0].device)
    return tuple((k[:, :, index], v[:, :, index]) for k, v in kv)


class AppendLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to grow, appended to in place; the room doubles when it
    runs out (a copy every doubling, not every token)."""

    def __init__(self, capacity: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.capacity = max(1, int(capacity))
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty(*key_states.shape[:-2], self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(*value_states.shape[:-2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        capacity = max(need, 2 * self.capacity)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:-2], capacity, old.shape[-1])
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None


class KVWorkspace(Cache):
    """A cache written in place (``AppendLayer`` per layer), started from a ``KV`` value with ``room`` more
    positions ready. ``run_decoder`` extends it in place; ``snapshot()`` is the value so far."""

    def __init__(self, kv: Optional[KV | KVParts], room: int = 256):
        n = kv_length(kv)
        pieces = [p for p in (kv if isinstance(kv, KVParts) else (kv,)) if p]
        n_layers = len(pieces[0]) if pieces else 0
        super().__init__(layers=[AppendLayer(n + room) for _ in range(n_layers)] or None,
                         layer_class_to_replicate=None if n_layers else functools.partial(AppendLayer, room))
        for piece in pieces:
            for i, (k, v) in enumerate(piece):
                self.layers[i].update(k, v)

    def snapshot(self) -> KV:
        return tuple((layer.keys, layer.values) for layer in self.layers)


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
    llm, inputs_embeds: torch.Tensor, kv: Optional[KV | KVWorkspace] = None, position_ids: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, KV | KVWorkspace]:
    """Run the LM's decoder stack on new positions after ``kv``.

    inputs_embeds: [B, L, H]. Returns the final post-norm hidden states [B, L, H] and the extended cache: a new
    ``KV`` value for a ``KV`` (which stays as it was), the same workspace, extended in place, for a ``KVWorkspace``,
    a new workspace for ``KVParts``.
    Positions default to the cache length + ``arange(L)``.
    """
    decoder = llm.get_decoder()
    start = kv.get_seq_length() if isinstance(kv, KVWorkspace) else kv_length(kv)
    if position_ids is None:
        position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
    if isinstance(kv, KVParts):
        kv = KVWorkspace(kv, room=inputs_embeds.shape[1])
    cache = kv if isinstance(kv, KVWorkspace) else _to_hf(kv)
    out = decoder(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_kwarg(type(decoder)): cache},
    )
    return out.last_hidden_state, (cache if isinstance(kv, KVWorkspace) else _from_hf(cache))
