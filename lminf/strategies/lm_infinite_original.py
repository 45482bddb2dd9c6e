"""LM-Infinite with top-k exactly as the authors' code applies it (Glaciohound/LM-Infinite),
for fidelity with their numbers. lminf's own top-k (`lminf-topk`) lets every query pick its
middle keys, scored at the cap; the original code differs in three ways (checked by running it
beside lminf, ../shared/reference/lm-infinite.md):

1. only the last query of each forward call picks (in `generate`: the last prompt token and
   every generated token), the other rows keep the plain Lambda shape;
2. middle keys are scored and read with the query at a fixed insertion distance
   (`top_k_insert_at`, 2,048 by default, whatever the window), not at the cap;
3. a query with fewer middle keys than `top_k` picks none.

Because of 1, the result depends on how the input is split into calls (`same_across_calls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lminf.strategies.base import register
from lminf.strategies.lm_infinite import LMInfinite


@register
@dataclass(frozen=True)
class LMInfiniteOriginal(LMInfinite):
    """LM-Infinite whose top-k follows the original code: the last query of each call picks its
    `top_k` best middle keys, read at distance `top_k_insert_at`, or none if there are fewer."""

    name = "lminf-original"
    presets = {"lminf-topk-original": {}}
    same_across_calls = False
    top_k_last_row = True
    top_k_all_or_none = True

    top_k: int = field(default=5, metadata={"help": "middle tokens each head also sees (lminf; 0: off)"})
    top_k_insert_at: int = field(
        default=2048, metadata={"help": "distance the original top-k rule scores and reads middle keys at (lminf-original)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k_insert_at < 0:
            raise ValueError(f"top_k_insert_at must be >= 0, got {self.top_k_insert_at}.")

    def top_k_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(q_pos, self.top_k_insert_at), torch.zeros_like(k_pos)

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        """Closed form over one call of `length` tokens (tested against Strategy.kept_pairs)."""
        middle, k = max(0, length - self.n_local - self.n_global), self.top_k_at(layer)
        plain = LMInfinite(n_global=self.n_global, n_local=self.n_local).kept_pairs(length, layer)
        return plain + (k if k and middle >= k else 0)
