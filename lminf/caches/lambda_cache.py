"""The bounded KV cache for Lambda attention.

Per layer it keeps the first `n_global` tokens (the strategy's global tokens plus the
batch's left padding, `left_pad`) and the `n_local` most recent ones; everything in between is dropped. Keys are
stored exactly as the model rotated them, at their true positions, and are never
re-indexed: the attention works out distances from real positions (lminf.layout), so
rotary positions stay exact after eviction. `get_seq_length()` counts every token seen,
so new tokens keep their true positions.

With `n_local=None` nothing is dropped (needed for top-k middle attention, which must
be able to score every middle key); memory then grows with the input.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class LambdaLayer(DynamicLayer):
    """Keys and values of one layer: [first n_global tokens | last n_local tokens]; its
    n_global counts the batch's left padding too (a strategy's n_global + left_pad).

    Once full, decoding one token at a time costs O(1) copies: the stored keys are laid
    out as [first n_global | ring of n_local - 1 | newest], and a step moves the newest key
    into the ring slot of the oldest and writes the new key last. The ring is out of order, which is
    harmless: all of it lies inside the new query's window (local, whatever the order), no
    padding is ever in it (left padding sits in the first n_global), and the query's own key is last.
    A multi-token update restores chronological order first.

    Before it is full, keys are appended into spare room that grows geometrically (up to
    the bound), so a decoding step copies one token, not the whole cache as torch.cat does.
    """

    is_croppable = False
    # True: no ring, keys stay in order (a decoding step then copies the window). ALiBi reads
    # each key's true distance from the Layout, which assumes the physical order.
    in_order = False
    kv_dtype: torch.dtype | None = None  # store keys and values in this dtype (lminf.patch's kv_dtype); None: as given
    key_room: torch.Tensor | None = None  # storage whose first tokens are self.keys (see _append)
    value_room: torch.Tensor | None = None

    def __init__(self, n_global: int, n_local: int | None):
        super().__init__()
        self.n_global, self.n_local = n_global, n_local
        self.cumulative_length = 0  # tokens seen, including dropped ones
        self.ring_start = 0  # oldest ring slot, when full

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # (B, H, 0, D), not 1-D

    def _full(self) -> bool:
        return self.n_local is not None and self.is_initialized and self.keys.shape[-2] == self.n_global + self.n_local

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_dtype is not None:  # this step's queries read the new keys as stored, as later ones will
            key_states, value_states = key_states.to(self.kv_dtype), value_states.to(self.kv_dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1 and self._full() and not self.in_order:
            self.cumulative_length += 1
            ring = self.n_local - 1
            if ring:
                slot = self.n_global + self.ring_start
                self.keys[..., slot, :] = self.keys[..., -1, :]
                self.values[..., slot, :] = self.values[..., -1, :]
                self.ring_start = (self.ring_start + 1) % ring
            self.keys[..., -1:, :] = key_states
            self.values[..., -1:, :] = value_states
            return self.keys, self.values
        if self._append(key_states, value_states):
            return self.keys, self.values
        keys = torch.cat((*self._chronological(self.keys), key_states), dim=-2)
        values = torch.cat((*self._chronological(self.values), value_states), dim=-2)
        self.ring_start = 0
        self.key_room = self.value_room = None
        self.cumulative_length += key_states.shape[-2]
        if self.n_local is not None and keys.shape[-2] > self.n_global + self.n_local:
            # Keep n_local, not n_local - 1: the next query's window needs n_local - 1 old keys,
            # and the spare slot is where a decoding step writes its key.
            self.keys = torch.cat((keys[..., : self.n_global, :], keys[..., -self.n_local :, :]), dim=-2)
            self.values = torch.cat((values[..., : self.n_global, :], values[..., -self.n_local :, :]), dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values  # this step's queries may need keys that are now dropped

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write new tokens after the stored ones, in place; False when they would not fit
        under the bound, or must not be written in place (out of order, or under autograd)."""
        n = key_states.shape[-2]
        if key_states.requires_grad or not self._room(n, key_states, value_states):
            return False
        self.keys[..., -n:, :] = key_states
        self.values[..., -n:, :] = value_states
        return True

    def reserve_one(self) -> int | None:
        """Room for one decoding token's key and value, which the caller then writes last in
        self.keys and self.values (lminf.decoding: lminf's C++ layers write them), after it
        moves the newest stored ones to the returned row (-1: none; the ring's oldest slot
        when full, as `update` does). None where `update` must take the token instead."""
        if not self.is_initialized or self.in_order:
            return None
        if self._full():
            self.cumulative_length += 1
            ring = self.n_local - 1
            if not ring:
                return -1
            slot = self.n_global + self.ring_start
            self.ring_start = (self.ring_start + 1) % ring
            return slot
        return -1 if self._room(1, self.keys, self.values) else None

    def _room(self, n: int, key_like: torch.Tensor, value_like: torch.Tensor) -> bool:
        """self.keys and self.values grown by n rows in place, their last n for the caller to
        write; False where they cannot be: out of order (a ring), or past the bound."""
        stored = self.keys.shape[-2]
        bound = None if self.n_local is None else self.n_global + self.n_local
        if self.ring_start or (bound is not None and stored + n > bound):
            return False
        room = self.key_room
        if not self._owns_room() or room.shape[:-2] != key_like.shape[:-2] or room.shape[-2] < stored + n:
            size = stored + n + (stored + n) // 4 + 256  # geometric: amortised O(1) copies per token
            size = size if bound is None else min(size, bound)
            self.key_room = self._grown(self.keys, key_like, size)
            self.value_room = self._grown(self.values, value_like, size)
        self.keys, self.values = self.key_room[..., : stored + n, :], self.value_room[..., : stored + n, :]
        self.cumulative_length += n
        return True

    @staticmethod
    def _grown(old: torch.Tensor, new: torch.Tensor, size: int) -> torch.Tensor:
        room = new.new_empty((*new.shape[:-2], size, new.shape[-1]))
        if old.shape[-2]:
            room[..., : old.shape[-2], :] = old
        return room

    def nbytes(self) -> int:
        """Bytes held for this layer, spare room included."""
        if not self.is_initialized:
            return 0
        held = [self.key_room, self.value_room] if self._owns_room() else [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in held)

    def _owns_room(self) -> bool:
        return self.key_room is not None and self.keys.numel() > 0 and self.key_room.data_ptr() == self.keys.data_ptr()

    def _chronological(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.ring_start == 0:
            return (x,)
        ring_at = self.n_global + self.ring_start
        return x[..., : self.n_global, :], x[..., ring_at:-1, :], x[..., self.n_global : ring_at, :], x[..., -1:, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(number of keys the next update returns, physical index where its tail starts)"""
        if query_length == 1 and self._full() and not self.in_order:  # a ring step: the oldest key is dropped first
            return self.n_global + self.n_local, self.cumulative_length + 1 - self.n_local
        stored = self.keys.shape[-2] if self.is_initialized else 0
        stored_global = min(self.n_global, self.cumulative_length)
        return stored + query_length, self.cumulative_length - (stored - stored_global)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.n_local is None else self.n_global + self.n_local

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.ring_start = 0
        self.key_room = self.value_room = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("lminf.LambdaCache cannot be cropped (assisted decoding is not supported).")


class LambdaCache(Cache):
    """A transformers `Cache` whose memory is bounded by n_global + n_local tokens per layer.

    Build it with `lminf.make_cache(model)`, which reads the settings from a patched model,
    or from its layers, which may differ (a model with sliding and global layers):
    `LambdaCache([LambdaLayer(n_global=10, n_local=8192) for _ in range(num_layers)])`.
    """

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes held by the stored keys and values of all layers."""
        return sum(layer.nbytes() for layer in self.layers)
