"""The middle layer of strategies that see the first `n_global` tokens and the last
`n_local` ones, and differ in where they read the first ones from (`far_positions`).

It runs them on one kernel (lminf.kernels.lambda_blocks) and one bounded cache
(lminf.caches.LambdaCache), and derives their dense rule from the same two methods, so a
strategy of this kind is its settings and `far_positions` (see sinks.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PretrainedConfig

from lminf.caches.lambda_cache import LambdaLayer
from lminf.families import training_length
from lminf.kernels.lambda_blocks import TopK, lambda_attention
from lminf.layout import Layout
from lminf.strategies.base import AttentionCall, Rule, Strategy


@dataclass(frozen=True)
class WindowedStrategy(Strategy):
    # Most recent tokens every query sees (itself included); None: the model's training length.
    n_local: int | None = field(default=None, metadata={"help": "window of recent tokens (default: the training length)"})

    def __post_init__(self) -> None:
        if self.n_local is not None and self.n_local < 1:
            raise ValueError(f"n_local must be >= 1, got {self.n_local}.")
        super().__post_init__()

    def resolve(self, config: PretrainedConfig) -> WindowedStrategy:
        return self if self.n_local is not None else dataclasses.replace(self, n_local=training_length(config))

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a query (positions q_pos) and a first token outside its window (k_pos) are
        placed for their logit -> (q_at, k_at), k_at None: the key stays at its position.
        Shapes broadcast: (B, Q) with (B, K) in the kernel, (B, Q, 1) with (B, 1, K) in `rule`."""
        raise NotImplementedError

    def top_k_at(self, layer: int) -> int:
        """Middle tokens each query head also picks in this layer (placed by `top_k_positions`)."""
        return 0

    # How top-k picks, where a strategy differs from the every-query rule (lm_infinite_original.py):
    top_k_last_row: ClassVar[bool] = False  # only the last query of each forward call picks
    top_k_all_or_none: ClassVar[bool] = False  # a query with fewer middle keys than top_k picks none

    def top_k_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a query and a middle key it may pick are placed (as `far_positions`); default: like the first ones."""
        return self.far_positions(q_pos, k_pos)

    @property
    def keeps_middle(self) -> bool:
        """True when the cache must keep every token (a query may pick any middle key)."""
        return False

    def cache_bound(self) -> int | None:
        return None if self.keeps_middle else self.n_global + self.n_local

    def plain_up_to(self) -> int:
        return self.n_local  # every pair is inside the window: nothing capped, nothing picked

    def keys_for(self, q_start: int, total: int) -> tuple[int, int]:
        tail_start = 0 if self.keeps_middle else max(0, q_start - self.n_local + 1)
        return min(self.n_global, tail_start), tail_start

    def cache_layer(self, left_pad: int = 0) -> LambdaLayer:
        return LambdaLayer(n_global=self.n_global + left_pad, n_local=None if self.keeps_middle else self.n_local)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
        return lambda_attention(
            q,
            k,
            v,
            layout,
            call,
            n_global=self.n_global,
            n_local=self.n_local,
            far=self.far_positions,
            top_k=self.top_k_spec(call.layer),
        )

    def top_k_spec(self, layer: int) -> TopK | None:
        """How the queries of `layer` pick middle keys; None: they pick none."""
        k = self.top_k_at(layer)
        if not k:
            return None
        own_positions = type(self).top_k_positions is not WindowedStrategy.top_k_positions
        return TopK(k, self.top_k_positions if own_positions else None, self.top_k_last_row, self.top_k_all_or_none)

    def rule(self, i: torch.Tensor, j: torch.Tensor, layer: int) -> Rule:
        d = i - j
        local = d < self.n_local
        far = ~local & (j < self.n_global)
        q_at, k_at = self.far_positions(i, j)
        far_distance = q_at - (j if k_at is None else k_at)
        q_top, k_top = self.top_k_positions(i, j)
        top_distance = q_top - (j if k_top is None else k_top)
        middle = ~local & ~far
        if self.top_k_last_row:  # the call's last query: the latest position of each row
            middle = middle & (i == i.amax(dim=1, keepdim=True))
        distance = torch.where(local, d, torch.where(far, far_distance, top_distance))
        return Rule(local | far, distance, middle, self.top_k_at(layer), top_k_all_or_none=self.top_k_all_or_none)

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        """Closed form of Strategy.kept_pairs (tested against it)."""
        n_local, n_global, top_k = self.n_local, self.n_global, self.top_k_at(layer)
        inside = min(length, n_local)
        beyond = length - inside  # the t-th query past the window sees min(t, n_global) first tokens
        ramp = min(beyond, n_global)
        pairs = inside * (inside + 1) // 2 + beyond * n_local + ramp * (ramp + 1) // 2 + (beyond - ramp) * n_global
        # Query p has max(0, p - n_local - n_global + 1) middle keys and picks min(top_k, that) of them.
        m, k = max(0, length - n_local - n_global), top_k
        return pairs + (m * (m + 1) // 2 if m <= k else k * (k + 1) // 2 + (m - k) * k)


@dataclass(frozen=True)
class ModelWindow(WindowedStrategy):
    """A model's own sliding-window layer, kept as the model defines it (Gemma 2/3, Mistral...):
    the last `n_local` tokens and no first tokens. Not a registered strategy: lminf.patching
    runs it in the sliding layers of a model, whatever strategy the global layers run."""

    n_global: int = 0

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, None]:
        return q_pos, None  # never asked: without first tokens no key is far

    def cache_layer(self, left_pad: int = 0) -> LambdaLayer:
        layer = super().cache_layer(left_pad)
        layer.is_sliding = True  # transformers builds the sliding layers' mask from this layer's sizes
        return layer
