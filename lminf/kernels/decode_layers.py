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
final norm and output layer. A step calls `enter` once, then for each layer but the last
`attend_leave_enter` (its attention, lminf.kernels.one_query (lminf's C++ kernel for a float32
query where it is built: lminf.kernels.native), its leave and the next one's enter:
one call a layer: 0.89-0.94x the time per step of the attention as a call of its own, the same
numbers; docs/measurements/merged-attention-ab.json),
and last the attention and `leave_head`. With 4-bit weights
(lminf.kernels.int4) the products stay torch's int4 kernel, called from inside the graphs, and
what lies between them compiles: 30 layers' `leave` took 7.0 ms against 10.1-10.5 as modules,
the same numbers (same machine, side by side).

Run eagerly (where compiling fails), each function is the modules' own computation: `linear` is
F.linear, `rms_norm` Llama's RMSNorm (in float32, back to the input's dtype), the MLP SiLU-gated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lminf.kernels import one_query
from lminf.kernels.compiling import compiled
from lminf.kernels.int4 import Int4Weights, int4_linear

# (weight (out, in), bias (out,) or None), or a 4-bit layer's tensors
Linear = tuple[torch.Tensor, torch.Tensor | None] | Int4Weights


def linear(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """F.linear; compiled, the same product as a reduction the compiler fuses with its
    neighbours. 4-bit weights: their kernel, either way."""
    if isinstance(layer, Int4Weights):
        return int4_linear(x, layer)
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


def side_by_side(x: torch.Tensor, layers: tuple[Linear, ...]) -> torch.Tensor:
    """The layers' outputs concatenated (one layer where they were joined, as 4-bit q, k, v are)."""
    return torch.cat([linear(x, layer) for layer in layers], -1)


def enter(x, cos, signed_sin, norm: torch.Tensor, qkv: tuple[Linear, ...], eps: float, n_q: int, n_qk: int, head_dim: int):
    """x (1, 1, hidden) -> the layer's query (1, Hq, D), key (1, Hkv, 1, D), value (1, Hkv, 1, D),
    q and k rotated; qkv: the q, k, v projections, or one layer whose output is all three."""
    y = side_by_side(rms_norm(x, norm, eps), qkv)  # (1, 1, [q | k | v]), n_qk channels of q and k
    qk = rope(y[..., :n_qk].view(1, -1, head_dim), cos, signed_sin)
    return qk[:, :n_q], qk[:, n_q:, None], y[..., n_qk:].view(1, -1, 1, head_dim)


def leave(x, attended, o: Linear, norm: torch.Tensor, gate_up: tuple[Linear, ...], down: Linear, eps: float):
    """x (1, 1, hidden) and the attention's output (1, Hq, D) -> x after the layer; gate_up: the
    gate and up projections, or one layer whose output is both."""
    x = x + linear(attended.reshape(1, 1, -1), o)
    gate, up = side_by_side(rms_norm(x, norm, eps), gate_up).chunk(2, -1)
    return x + linear(F.silu(gate) * up, down)


def head(x, norm: torch.Tensor, output: Linear, eps: float) -> torch.Tensor:
    """x (1, 1, hidden) -> the next token's logits (1, vocab), float32."""
    return linear(rms_norm(x, norm, eps), output)[:, -1].float()


def leave_enter(x, attended, after: tuple, cos, signed_sin, before: tuple):
    """`leave` one layer (its arguments after x and attended: `after`), then `enter` the next
    (after x and the rotation: `before`) -> (x, query, key, value): one call between two
    attentions, not two (a compiled call costs 20-50 µs of guards and launch on a CPU)."""
    x = leave(x, attended, *after)
    return x, *enter(x, cos, signed_sin, *before)


def attend_leave_enter(rows, keys, values, scaling: float, x, after: tuple, cos, signed_sin, before: tuple):
    """A layer's attention (lminf.kernels.one_query: rows (1, Hkv, rep, D) over every key and
    value given), then `leave_enter` -> (x, query, key, value): one compiled call a layer, not
    two (the attention's own graph, then the rest)."""
    attended = one_query.one_query(rows, keys, values, scaling).reshape(1, -1, rows.shape[-1])
    return leave_enter(x, attended, after, cos, signed_sin, before)


def attend_in_parts_leave_enter(rows, keys, values, scaling: float, parts: int, x, after: tuple, cos, signed_sin, before: tuple):
    """`attend_leave_enter` with the attention's sums in `parts` parts (lminf.kernels.one_query.one_query_in_parts)."""
    attended = one_query.one_query_in_parts(rows, keys, values, scaling, parts).reshape(1, -1, rows.shape[-1])
    return leave_enter(x, attended, after, cos, signed_sin, before)


def leave_head(x, attended, after: tuple, norm: torch.Tensor, output: Linear, eps: float) -> torch.Tensor:
    """`leave` the last layer, then `head`: the next token's logits (1, vocab), float32."""
    return head(leave(x, attended, *after), norm, output, eps)


# Static shapes: a step's layers all have the same, so each is one graph for every layer.
compiled_enter = compiled(enter, dynamic=False)  # the first layer's
compiled_leave_enter = compiled(leave_enter, dynamic=False)
compiled_leave_head = compiled(leave_head, dynamic=False)
# The number of keys grows while the cache fills: marked dynamic (below), the rest static.
_attend_leave_enter = compiled(attend_leave_enter, dynamic=None)
_attend_in_parts_leave_enter = compiled(attend_in_parts_leave_enter, dynamic=None)


def compiled_attend_leave_enter(rows, keys, values, scaling: float, x, after: tuple, cos, signed_sin, before: tuple):
    """`attend_leave_enter` compiled, its attention in parts over more than
    lminf.kernels.one_query.PARTS_ABOVE keys; one graph for every number of keys (past one)."""
    for stored in (keys, values):
        torch._dynamo.maybe_mark_dynamic(stored, 2)
    parts = one_query.parts(keys.shape[-2], rows)
    if parts > 1:
        return _attend_in_parts_leave_enter(rows, keys, values, scaling, parts, x, after, cos, signed_sin, before)
    return _attend_leave_enter(rows, keys, values, scaling, x, after, cos, signed_sin, before)
