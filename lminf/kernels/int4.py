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

import torch

COMPUTE = torch.bfloat16
_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes (N, K) in 0..15, scale (N, K / group), zero (N, K / group))


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
        flat = x.reshape(-1, self.in_features).to(COMPUTE)
        y = 0
        for i in range(self.n_parts):
            y = y + _MM(flat, getattr(self, f"packed{i}"), self.group, getattr(self, f"scale_zero{i}")).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, parts={self.n_parts}"
