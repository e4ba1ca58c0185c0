"""The static KV cache: one [B, Hkv, L, D] buffer per layer for K and for V, written in place, never reallocated.

The prefill writes the prompts through ``update`` (duck-typing the part of transformers' ``Cache`` that decoder
layers call). Decode steps pass no cache object to the model: the attention op gets the buffers of the live
rows (``views``) and writes the new token's K/V itself. Compaction moves the live rows to the front
(``compact``), so the live batch is always the first ``n`` rows, and a captured graph for ``n`` rows keeps
pointing at the right memory.
"""

from __future__ import annotations

import torch as th


class StaticKVCache:
    """Per-layer K/V buffers of ``max_len`` slots for a fixed batch, allocated by the first (prefill) forward."""

    is_compileable = False

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[th.Tensor | None] = [None] * num_layers
        self.values: list[th.Tensor | None] = [None] * num_layers
        self.prefill_len = 0  # slots the next ``update`` writes (from slot 0)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        """Prefill: write the prompt's K/V into slots ``[0, p)`` and return them (what the layer attends to)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None:  # allocated with the prefill's dtype, device and head shapes
            b, h, _, d = key_states.shape
            keys = self.keys[layer_idx] = key_states.new_zeros(b, h, self.max_len, d)
            shape = (b, value_states.shape[1], self.max_len, value_states.shape[-1])
            values = self.values[layer_idx] = value_states.new_zeros(shape)
        p = key_states.shape[2]
        keys[:, :, :p].copy_(key_states)
        values[:, :, :p].copy_(value_states)
        return keys[:, :, :p], values[:, :, :p]

    def layout(self) -> tuple | None:
        """(K heads, K head dim, V heads, V head dim, dtype) of the buffers; None before the first prefill."""
        k, v = self.keys[0], self.values[0]
        return None if k is None else (k.shape[1], k.shape[3], v.shape[1], v.shape[3], k.dtype)

    def allocate(self, batch: int, layout: tuple, device) -> None:
        """The buffers of an earlier cache's ``layout`` (what its prefill's ``update`` allocated), made now."""
        kh, kd, vh, vd, dtype = layout
        for i, keys in enumerate(self.keys):
            if keys is None:
                self.keys[i] = th.zeros(batch, kh, self.max_len, kd, dtype=dtype, device=device)
                self.values[i] = th.zeros(batch, vh, self.max_len, vd, dtype=dtype, device=device)

    def views(self, n: int) -> tuple[list[th.Tensor], list[th.Tensor]]:
        """The buffers of the first ``n`` rows (contiguous views: same memory at every call)."""
        return [k[:n] for k in self.keys], [v[:n] for v in self.values]

    @th.no_grad()
    def compact(self, index: th.Tensor) -> None:
        """Rows ``index`` (on the device) become rows ``0..len(index)-1``, one layer at a time (a small temporary)."""
        m = index.numel()
        for buf in self.keys + self.values:
            buf[:m] = buf.index_select(0, index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
