"""A linear layer that keeps 4-bit weights and multiplies with torch's int4 CPU kernel.

The weight is stored as 4-bit codes in groups of `group` along the input dimension, each
group with a scale and a zero: w = (code - 8) * scale + zero, the form torch's
`_weight_int4pack_mm_for_cpu` reads. A layer may hold several such parts whose products
add up (an 8-bit code is 16 * high nibble + low nibble: two 4-bit parts). Reading 4 bits a
weight instead of 32 is what makes decoding faster: a decoding step reads every weight.

The kernel is fast with bfloat16 activations, scales and output only (float32 runs a slow
path), so inputs are rounded to bfloat16 here and outputs come back in the input's dtype:
not exact (one-pass NLL within 0.05% on two books, docs/results.md), which is why it is an option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

COMPUTE = torch.bfloat16
_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
TILE = 64  # the kernel packs its rows in tiles of this many: packed layers join only at a tile's edge
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes (N, K) in 0..15, scale (N, K / group), zero (N, K / group))


class Int4Weights(NamedTuple):
    """An Int4Linear's tensors, as `int4_linear` reads them (also inside a compiled graph)."""

    packed: tuple[torch.Tensor, ...]  # per part, the kernel's packing of its codes
    scale_zero: tuple[torch.Tensor, ...]  # per part, (K / group, N, [scale, zero]) in COMPUTE
    group: int
    bias: torch.Tensor | None


def int4_linear(x: torch.Tensor, weights: Int4Weights) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias), W the sum of the parts; the kernel reads bfloat16 inputs, the output is in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(COMPUTE)
    y = _MM(flat, weights.packed[0], weights.group, weights.scale_zero[0]).to(x.dtype)
    for packed, scale_zero in zip(weights.packed[1:], weights.scale_zero[1:], strict=True):
        y = y + _MM(flat, packed, weights.group, scale_zero).to(x.dtype)
    y = y.reshape(*x.shape[:-1], -1)
    return y if weights.bias is None else y + weights.bias


def available() -> bool:
    return _MM is not None and _PACK is not None


def _packed(codes: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The kernel's packing of codes (N, K), a block of rows at a time: the int32 copy it wants
    stays small (an output layer of 49,152 rows would need 113 MB at once). Rows pack independently."""
    return torch.cat([_PACK(codes[a : a + rows].to(torch.int32).contiguous(), 1) for a in range(0, codes.shape[0], rows)])


class Int4Linear(torch.nn.Module):
    """y = x @ W.T (+ bias), W the sum of its 4-bit parts; runs on CPU."""

    def __init__(self, parts: list[Part], group: int, bias: torch.Tensor | None = None):
        """parts: one or more (codes, scale, zero); the layer's weight is their sum."""
        super().__init__()
        if not available():
            raise RuntimeError(f"torch {torch.__version__} has no int4 CPU kernel; low-bit weights need torch >= 2.6.")
        self.out_features, self.in_features = parts[0][0].shape
        self.group = group
        for i, (codes, scale, zero) in enumerate(parts):
            groups = (self.out_features, self.in_features // group)
            if codes.shape != (self.out_features, self.in_features) or scale.shape != groups or zero.shape != groups:
                raise ValueError(f"part {i}: codes {tuple(codes.shape)} and scales {tuple(scale.shape)} do not match.")
            self.register_buffer(f"packed{i}", _packed(codes))
            # The kernel's layout: (K / group, N, [scale, zero]).
            self.register_buffer(f"scale_zero{i}", torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(COMPUTE))
        self.n_parts = len(parts)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("lminf's 4-bit weights run on CPU only; load the model with dense weights for a GPU.")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features; this layer takes {self.in_features}.")
        return int4_linear(x, self.weights())

    def weights(self) -> Int4Weights:
        """Its tensors (views of its buffers, not copies)."""
        parts = range(self.n_parts)
        packed = tuple(getattr(self, f"packed{i}") for i in parts)
        return Int4Weights(packed, tuple(getattr(self, f"scale_zero{i}") for i in parts), self.group, self.bias)

    @classmethod
    def side_by_side(cls, layers: Sequence[Int4Linear]) -> Int4Linear:
        """One layer whose output is `layers`' outputs concatenated (q, k and v in one kernel call).
        Their codes are shared, not copied: each layer's become rows of the new layer's (the
        kernel packs tiles of TILE rows independently); only the small scales are copied."""
        if not cls.fit_side_by_side(layers):
            raise ValueError(
                f"layers side by side need the same inputs, groups, parts and bias or none, and all but the last "
                f"a multiple of {TILE} outputs."
            )
        first = layers[0]
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.group, fused.n_parts = first.in_features, first.group, first.n_parts
        fused.out_features = sum(layer.out_features for layer in layers)
        for i in range(first.n_parts):
            packed = torch.cat([getattr(layer, f"packed{i}") for layer in layers])
            fused.register_buffer(f"packed{i}", packed)
            fused.register_buffer(f"scale_zero{i}", torch.cat([getattr(layer, f"scale_zero{i}") for layer in layers], 1))
            start = 0
            for layer in layers:
                setattr(layer, f"packed{i}", packed[start : start + layer.out_features])
                start += layer.out_features
        biases = None if first.bias is None else torch.cat([layer.bias for layer in layers])
        fused.bias = None if biases is None else torch.nn.Parameter(biases, requires_grad=False)
        return fused

    @staticmethod
    def fit_side_by_side(layers: Sequence[torch.nn.Module]) -> bool:
        """Whether `side_by_side` can join these layers."""
        if not layers or not all(isinstance(layer, Int4Linear) for layer in layers):
            return False
        first = layers[0]
        same = all(
            (layer.in_features, layer.group, layer.n_parts, layer.bias is None)
            == (first.in_features, first.group, first.n_parts, first.bias is None)
            for layer in layers
        )
        return same and all(layer.out_features % TILE == 0 for layer in layers[:-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, parts={self.n_parts}"
