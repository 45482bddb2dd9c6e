"""A decoding step's layers around their attention, as graphs torch.compile generates (kernel "compiled").

Why: one token through a layer multiplies one row by each weight matrix, so a step is bound by
reading the weights. On a CPU torch's float32 matrix-vector product reads them at a third to a
half of the memory bandwidth: 9.7 GB/s (weights as loaded) and 13.7 GB/s (stored input-major,
lminf.kernels.linear_layout) against 27 GB/s for a plain sum over the same bytes, on the
default model's shapes (2-core AMD EPYC, 2 threads). Written as a reduction, (x * W).sum(-1)
over row-major weights, and compiled with the norm, activation and residuals around it, the
products read at 29 GB/s (output projection and MLP of 30 layers, side by side: 32.7 ms eager,
12.3 ms compiled). So a layer runs as two graphs around its attention: `enter` (norm, q, k, v,
rotary) and `leave` (output projection, residual, norm, gated MLP, residual); `head` is the
final norm and output layer.

Run eagerly (where compiling fails), each function is the modules' own computation: `linear` is
F.linear, `rms_norm` Llama's RMSNorm (in float32, back to the input's dtype), the MLP SiLU-gated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lminf.kernels.compiling import compiled

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)


def linear(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """F.linear; compiled, the same product as a reduction the compiler fuses with its neighbours."""
    weight, bias = layer
    if not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = (x[..., None, :] * weight).sum(-1)
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (also Mistral's and Qwen2's): computed in float32, then the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (1, H, D) rotated: x * cos + rotate_half(x) * sin, with signed_sin = sin with its first half negated."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def enter(x, cos, signed_sin, norm: torch.Tensor, q: Linear, k: Linear, v: Linear, eps: float, head_dim: int):
    """x (1, 1, hidden) -> the layer's query (1, Hq, D), key (1, Hkv, 1, D), value (1, Hkv, 1, D), rotated."""
    h = rms_norm(x, norm, eps)
    query, key = (rope(linear(h, w).view(1, -1, head_dim), cos, signed_sin) for w in (q, k))
    return query, key[:, :, None], linear(h, v).view(1, -1, 1, head_dim)


def leave(x, attended, o: Linear, norm: torch.Tensor, gate: Linear, up: Linear, down: Linear, eps: float):
    """x (1, 1, hidden) and the attention's output (1, Hq, D) -> x after the layer."""
    x = x + linear(attended.reshape(1, 1, -1), o)
    h = rms_norm(x, norm, eps)
    return x + linear(F.silu(linear(h, gate)) * linear(h, up), down)


def head(x, norm: torch.Tensor, output: Linear, eps: float) -> torch.Tensor:
    """x (1, 1, hidden) -> the next token's logits (1, vocab), float32."""
    return linear(rms_norm(x, norm, eps), output)[:, -1].float()


# Static shapes: a step's layers all have the same, so each is one graph for every layer.
compiled_enter = compiled(enter, dynamic=False)
compiled_leave = compiled(leave, dynamic=False)
compiled_head = compiled(head, dynamic=False)
