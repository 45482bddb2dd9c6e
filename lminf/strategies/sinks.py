"""StreamingLLM's attention sinks (Xiao et al., ICLR 2024), as a baseline for LM-Infinite."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lminf.strategies.base import register
from lminf.strategies.windowed import WindowedStrategy


@register
@dataclass(frozen=True)
class Sinks(WindowedStrategy):
    """The same tokens as LM-Infinite without top-k, but positions re-indexed inside a
    [n_global | n_local] cache instead of the cap: a first token keeps its position j and
    the query sits where it would in that cache, min(i, n_global + n_local - 1), so the
    distance grows up to n_global + n_local - 1 - j."""

    name = "sinks"

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, None]:
        return q_pos.clamp(max=self.n_global + self.n_local - 1), None
