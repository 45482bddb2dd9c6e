"""LM-Infinite (Han et al., NAACL 2024, arXiv 2308.16137): Lambda-shaped attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from lminf.strategies.base import register
from lminf.strategies.windowed import WindowedStrategy


@register
@dataclass(frozen=True)
class LMInfinite(WindowedStrategy):
    """Each query sees the first `n_global` tokens, read at the distance cap `n_local`, and
    the last `n_local` tokens as usual; with `top_k` > 0, in layers >= `top_k_from_layer`,
    each query head also picks its `top_k` best middle tokens, read at the cap too (the
    cache then keeps every token)."""

    name = "lminf"
    presets = {"lminf": {"top_k": 0}, "lminf-topk": {}}

    top_k: int = field(default=0, metadata={"help": "middle tokens each head also sees (lminf; 0: off)"})
    top_k_from_layer: int = field(default=4, metadata={"help": "first layer that picks top-k middle tokens"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")

    def resolve(self, config: PretrainedConfig) -> LMInfinite:
        layers = config.num_hidden_layers
        if self.top_k and not 0 <= self.top_k_from_layer < layers:
            raise ValueError(
                f"top_k={self.top_k} has no room: top_k_from_layer={self.top_k_from_layer} "
                f"but the model's layers are 0..{layers - 1}."
            )
        return super().resolve(config)

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The cap: the query moves to position n_local and the key to 0, so they meet at distance n_local.
        return torch.full_like(q_pos, self.n_local), torch.zeros_like(k_pos)

    def top_k_at(self, layer: int) -> int:
        return self.top_k if layer >= self.top_k_from_layer else 0

    @property
    def keeps_middle(self) -> bool:
        return self.top_k > 0
