"""The bounded KV cache for Lambda attention.

Per layer it keeps the first `n_sink` tokens (the global tokens, plus room for left
padding) and the `n_local` most recent ones; everything in between is dropped. Keys are
stored exactly as the model rotated them, at their true positions, and are never
re-indexed: the attention works out distances from real positions (lminf.layout), so
rotary positions stay exact after eviction. `get_seq_length()` counts every token seen,
so new tokens keep their true positions.

With `n_local=None` nothing is dropped (needed for top-k middle attention, which must
be able to score every middle key); memory then grows with the input.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class LambdaLayer(DynamicLayer):
    """Keys and values of one layer: [first n_sink tokens | last n_local tokens]."""

    is_croppable = False

    def __init__(self, n_sink: int, n_local: int | None):
        super().__init__()
        self.n_sink, self.n_local = n_sink, n_local
        self.cumulative_length = 0  # tokens seen, including dropped ones

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat((self.keys, key_states), dim=-2)
        values = torch.cat((self.values, value_states), dim=-2)
        self.cumulative_length += key_states.shape[-2]
        if self.n_local is not None and keys.shape[-2] > self.n_sink + self.n_local:
            # Keep n_local, not n_local - 1: the next query's window needs n_local - 1 old keys;
            # one spare key is masked by position and keeps the bookkeeping simple.
            self.keys = torch.cat((keys[..., : self.n_sink, :], keys[..., -self.n_local :, :]), dim=-2)
            self.values = torch.cat((values[..., : self.n_sink, :], values[..., -self.n_local :, :]), dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values  # this step's queries may need keys that are now dropped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(number of keys the next update returns, physical index where its tail starts)"""
        stored = self.keys.shape[-2] if self.is_initialized else 0
        n_sinks = min(self.n_sink, self.cumulative_length)
        return stored + query_length, self.cumulative_length - (stored - n_sinks)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.n_local is None else self.n_sink + self.n_local

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("lminf.LambdaCache cannot be cropped (assisted decoding is not supported).")


class LambdaCache(Cache):
    """A transformers `Cache` whose memory is bounded by n_sink + n_local tokens per layer.

    Build it with `lminf.make_cache(model)`, which reads the settings from a patched model,
    or directly: `LambdaCache(num_layers, n_sink=10, n_local=8192)`.
    """

    def __init__(self, num_layers: int, n_sink: int, n_local: int | None):
        if n_sink < 0 or (n_local is not None and n_local < 1):
            raise ValueError(f"LambdaCache needs n_sink >= 0 and n_local >= 1 (or None); got {n_sink}, {n_local}.")
        super().__init__(layers=[LambdaLayer(n_sink, n_local) for _ in range(num_layers)])

    def memory_bytes(self) -> int:
        """Bytes held by the stored keys and values of all layers."""
        return sum(
            t.numel() * t.element_size() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)
        )
