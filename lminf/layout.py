"""Where every query and key of one attention call sits in its sequence.

transformers asks a registered mask function for "the mask" once per forward and hands
the result to every layer. For Lambda attention a mask is the wrong shape of information
(it would be n x n); what the attention needs is each token's position in its own row,
so our mask function returns a `Layout` instead.

Physical order: a cache returns keys as [the first n_global keys | a contiguous tail],
both in the order they were fed, and the queries are the last `Q` keys of the tail:

    physical index:  0 .. n_global-1   kv_offset ................. total-1
    keys:            [ first        ][ tail ...............[ queries ]]

(Exception: once LambdaCache is full, a one-token decoding step returns its window out of
order; every key there is local to the query whatever its position, see lminf.caches.)

Real positions count only non-padding tokens of a row (left or right padding), so a
padded row sees the same positions as the row alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    q_pos: torch.Tensor  # (B, Q) long: real position of each query
    k_pos: torch.Tensor  # (B, K) long: real position of each key
    k_valid: torch.Tensor  # (B, K) bool: False for padding
    # One Layout serves every layer of a forward pass: what depends only on positions
    # (rotation tables, masks, the shape of the windows) is worked out once, here.
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, *args, **kwargs) -> Layout:
        """Itself: a model that casts the mask it gets (MPT: `.to(torch.bool)`) keeps the Layout."""
        return self

    def once(self, key: tuple, make: Callable[..., T], *args) -> T:
        """make(*args), computed on the first call with this key and reused after."""
        if key not in self._memo:
            self._memo[key] = make(*args)
        return self._memo[key]


def build_layout(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    attention_mask: torch.Tensor | None,
    device: torch.device | str,
) -> Layout:
    """Layout for `q_length` new tokens after `q_offset` tokens seen, given the cache's
    (kv_length, kv_offset) report and the 2D padding mask over all tokens seen."""
    if q_length == 0:
        raise ValueError("lminf: the input is empty (0 tokens); give at least one token.")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    total = q_offset + q_length
    n_global = kv_length - (total - kv_offset)
    if n_global < 0 or n_global > kv_offset:
        raise ValueError(
            f"lminf: the cache reported kv_length={kv_length}, kv_offset={kv_offset} for {total} tokens; "
            "use lminf.LambdaCache or transformers.DynamicCache with a patched model."
        )
    physical = torch.cat((torch.arange(n_global, device=device), torch.arange(kv_offset, total, device=device)))
    if attention_mask is None:
        k_pos = physical.expand(batch_size, -1)
        q_pos = torch.arange(q_offset, total, device=device).expand(batch_size, -1)
        return Layout(q_pos=q_pos, k_pos=k_pos, k_valid=torch.ones_like(k_pos, dtype=torch.bool))
    if attention_mask.ndim != 2 or attention_mask.shape[-1] != total:
        raise ValueError(
            f"lminf: attention_mask must be 2D (batch, all tokens seen so far) = (..., {total}); "
            f"got shape {tuple(attention_mask.shape)}."
        )
    mask = attention_mask.to(device=device, dtype=torch.bool).expand(batch_size, -1)
    real = mask.long().cumsum(-1) - 1
    return Layout(q_pos=real[:, q_offset:], k_pos=real[:, physical], k_valid=mask[:, physical])


def lambda_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **_: object,
) -> Layout:
    """The function registered with transformers' `AttentionMaskInterface`."""
    return build_layout(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device)
