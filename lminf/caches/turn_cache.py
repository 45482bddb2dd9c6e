"""The cache of a strategy that evicts by score at turn boundaries (SirLLM).

Per layer (`ScoredLayer`) it keeps at most `n_global + n_scored + n_local` tokens, their keys
as the model rotated them, at their true positions, which it keeps beside them (`positions`):
the attention re-places them (lminf.strategies.sirllm). The cache (`TurnCache`) keeps one
score per kept token, the same for every layer, and evicts the same tokens in every layer:

- `begin_turn(n)` announces a turn of n tokens: it makes room for them (or for the first
  piece of a longer turn), then multiplies every stored score by the decay;
- `make_room(m)` before a forward call of m tokens (the patched forward calls it): when the
  stored tokens and the m new ones exceed the bound, it keeps the `n_scored - m` best-scored
  tokens, the first `n_global`, and the most recent ones up to `bound - m`, in their order;
- `record(scores)` after that call: the scores of its tokens (lminf.strategies.sirllm).

A call longer than `n_scored + n_local` cannot fit: the patched forward feeds it in
`pieces`, each one a call that makes its own room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from lminf.caches.lambda_cache import LambdaCache
from lminf.caches.rows import RowState
from lminf.layout import Layout

if TYPE_CHECKING:
    from lminf.strategies.sirllm import SirLLM


class ScoredLayer(RowState, DynamicLayer):
    """Keys and values of one layer, (B, Hkv, n, D), and their true positions (B, n)."""

    is_croppable = False
    row_state = ("positions",)

    def __init__(self, settings: SirLLM):
        super().__init__()
        self.settings = settings
        self.bound = settings.cache_bound()
        self.positions: torch.Tensor | None = None
        self.seen = 0  # tokens seen, evicted ones included

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=key_states.device)

    def stored(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        m = key_states.shape[-2]
        if self.stored() + m > self.bound:  # the patched forward makes room first; a bare decoder call does not
            raise ValueError(
                f"the sirllm cache holds {self.stored()} of at most {self.bound} tokens and was given {m} more: "
                "call the patched model (its forward makes room and records the scores), not its decoder alone."
            )
        new = torch.arange(self.seen, self.seen + m, device=self.positions.device).expand(key_states.shape[0], -1)
        self.keys = torch.cat((self.keys, key_states), dim=-2)
        self.values = torch.cat((self.values, value_states), dim=-2)
        self.positions = torch.cat((self.positions, new), dim=-1)
        self.seen += m
        return self.keys, self.values

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` (B, t), stored order, in every row."""
        at = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, at), self.values.gather(2, at)
        self.positions = self.positions.gather(1, index)

    def key_layout(self, layout: Layout) -> Layout:
        """The forward's Layout with the true positions of the keys this layer returned (the
        mask function only knows how many there are); one for every layer of the forward."""
        valid = torch.ones_like(self.positions, dtype=torch.bool)
        return layout.once(("scattered keys",), Layout, layout.q_pos, self.positions, valid)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the next update returns, an offset that places the queries right; key_layout places the keys)"""
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.bound

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def reset(self) -> None:
        super().reset()
        self.positions, self.seen = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the sirllm cache cannot be cropped (assisted decoding is not supported).")


class TurnCache(RowState, LambdaCache):
    """A `Cache` of ScoredLayers (and the model's own sliding layers, if any) that shares
    one score per kept token between its layers and evicts at turns. `lminf.make_cache` builds it."""

    row_state = ("scores", "last_logprobs")

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers)
        self.scored = [layer for layer in layers if isinstance(layer, ScoredLayer)]
        self.settings = self.scored[0].settings
        self.scores: torch.Tensor | None = None  # (B, stored) float64
        self.last_logprobs: torch.Tensor | None = None  # (B, vocab): the last call's prediction of the next token

    def stored(self) -> int:
        return self.scored[0].stored()

    def pieces(self, m: int) -> list[int]:
        """How a call of m tokens is fed: whole where it fits after eviction, else in pieces of
        half the room, so each piece still sees the best and most recent of the ones before it."""
        s = self.settings
        room = s.n_scored + s.n_local
        if m <= room or self.stored() + m <= s.cache_bound():
            return [m]
        piece = max(1, room // 2)
        return [piece] * (m // piece) + ([m % piece] if m % piece else [])

    def begin_turn(self, n: int) -> None:
        """A turn of n tokens starts: room for them (for its first piece, if it is longer), then the decay."""
        if n < 1:
            raise ValueError(f"a turn has at least one token, got {n}.")
        self.make_room(self.pieces(n)[0])
        if self.scores is not None:
            self.scores = self.scores * self.settings.decay

    def make_room(self, m: int) -> None:
        """Evict, in every layer, so that m more tokens fit (m <= n_scored + n_local, or the cache holds them as it is)."""
        s, stored = self.settings, self.stored()
        target = s.cache_bound() - m
        if stored <= target:
            return
        if m > s.n_scored + s.n_local:
            raise ValueError(
                f"a call of {m} tokens cannot fit in the sirllm cache: feed it in pieces (the patched forward does)."
            )
        if self.scores is None or self.scores.shape[-1] != stored:
            raise ValueError(
                "the sirllm cache has keys without scores: call the patched model (its forward records them), "
                "not its decoder alone."
            )
        index = kept_indices(self.scores, s.n_global, s.n_scored - m, target)
        for layer in self.scored:
            layer.keep(index)
        self.scores = self.scores.gather(1, index)

    def record(self, scores: torch.Tensor, last_logprobs: torch.Tensor) -> None:
        """The scores (B, m) of the tokens the last call stored, and its prediction of the next token."""
        scores = scores.to(torch.float64)
        self.scores = scores if self.scores is None else torch.cat((self.scores, scores), dim=-1)
        self.last_logprobs = last_logprobs

    def reset(self) -> None:
        super().reset()
        self.scores = self.last_logprobs = None


def kept_indices(scores: torch.Tensor, n_global: int, n_best: int, target: int) -> torch.Tensor:
    """Which of the stored tokens (scores (B, n)) stay, (B, target) in stored order: the
    `n_best` best-scored ones (ties: the earlier one), the first `n_global`, then the most
    recent ones until `target` are kept (target < n, and the first two sets fit in it)."""
    B, n = scores.shape
    keep = torch.zeros(B, n, dtype=torch.bool, device=scores.device)
    if n_best > 0:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        keep.scatter_(1, order[:, :n_best], True)
    keep[:, :n_global] = True
    short = target - keep.sum(-1, keepdim=True)  # recent ones still to add, per row
    from_newest = (~keep).flip(-1).cumsum(-1).flip(-1)  # 1 for the newest not yet kept, 2 for the next...
    keep |= ~keep & (from_newest <= short)
    return keep.nonzero()[:, 1].view(B, target)


def begin_turn(cache: Cache | None, n: int) -> None:
    """Announce a turn of n tokens to a cache that counts turns (SirLLM's); others need nothing."""
    if isinstance(cache, TurnCache):
        cache.begin_turn(n)
