"""A decoding step's attention: one query's grouped heads over the stored keys, as one kernel
that torch.compile generates from the plain formula.

Why: torch's fused CPU kernel rounds the query to the cache's dtype and, on a 16-bit cache,
spends more time converting than reading: over 8,196 keys a layer (the default model's window
and first tokens, 3 key heads of 3 query rows, 30 layers' caches) it took 1.71 ms a layer with a
bfloat16 cache and 1.51 with float32, against 0.86 and 1.12 for the kernel below (2-core AMD
EPYC, 2 threads; benchmarks/one_query_kernel.py). This one reads every stored key and value
once, in its stored dtype, and sums in the query's (float32; float64 in the tests), so a 16-bit
cache halves what a step reads and the query keeps its float32 bits. End to end (README, the
race) it made decoding with a bfloat16 cache 1.3-1.4x faster, and float32 decoding no faster
alone: there the layers around it are compiled too (lminf.kernels.decode_layers).
"""

from __future__ import annotations

import torch

from lminf.kernels import native
from lminf.kernels.compiling import compiled, compiles

# "compiled": the decoding step's one-query pass through `compiled_pass` (lminf.fast_decode).
COMPILED = "compiled"
_native = None  # lminf's C++ kernel (lminf.kernels.native) once `prepare` (a FastStep's start) found it; read inside the graphs


def prepare() -> bool:
    """Build or load lminf's C++ kernel before a graph that calls it is traced; whether it runs."""
    global _native
    _native = native.op()
    return _native is not None


def _on_native(rows: torch.Tensor) -> bool:
    return _native is not None and rows.dtype == torch.float32 and rows.device.type == "cpu"


def native_pass(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, far: tuple = ()):
    """`one_query` on lminf's C++ kernel, called directly (no graph) -> (1, Hkv, rep, D) float32; None
    where it does not run. far: () or (cos, sin) (n_far, D): the kernel turns the first n_far keys by them as it reads them."""
    return _native(rows[0], keys[0], values[0], scaling, *far)[None] if _on_native(rows) else None


def one_query(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """rows (1, Hkv, rep, D): a query's heads grouped by their key head; keys and values
    (1, Hkv, S, D), S > 0 -> (1, Hkv, rep, D) in rows' dtype. No mask: every key is seen.
    float32 rows on a CPU: lminf's C++ kernel where `prepare` found it (the same sums in one pass)."""
    out = native_pass(rows, keys, values, scaling)
    if out is not None:
        return out
    k, v = keys[0].to(rows.dtype), values[0].to(rows.dtype)
    # One reduction per query row, not one broadcast over the rows: the compiler fuses the
    # rows' sums into one loop over the keys, so each key is read once (0.54 vs 0.84 ms a layer
    # on a bfloat16 cache, 2-core AMD EPYC, side by side as in benchmarks/one_query_kernel.py).
    scores = torch.stack([(rows[0, :, r, None] * k).sum(-1) for r in range(rows.shape[2])], 1) * scaling
    p = torch.softmax(scores, -1)
    return torch.stack([(p[:, r, :, None] * v).sum(-2) for r in range(rows.shape[2])], 1)[None]


# Above this many keys the pass runs in parts: the compiler sums more than 4,096 float32 terms
# through a slower, more accurate loop (inductor's cascade sum): over the default model's 8,196
# keys one part took 1.32 and 1.00 ms a layer in two runs against 1.19 and 0.80 in 8 parts
# (float32 cache), 0.84 and 0.64 against 0.57 (bfloat16); 2-core AMD EPYC, 2 threads,
# benchmarks/one_query_kernel.py, docs/measurements/one-query-kernel.json. Decoding at 8k: 1.1x
# (float32) and 1.2x (4-bit weights, 16-bit cache) faster (docs/measurements/decode-step-ab-session29.json).
PARTS_ABOVE = 4096


def one_query_in_parts(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, parts: int) -> torch.Tensor:
    """`one_query` with the keys' sums taken in `parts` parts (each of S // parts keys, and the
    S % parts keys left over) and then added; the same softmax (one maximum over every key)."""
    k, v = keys[0].to(rows.dtype), values[0].to(rows.dtype)
    hkv, n_keys, d = k.shape
    rep, size = rows.shape[2], n_keys // parts
    cut = size * parts
    scores = torch.stack([(rows[0, :, r, None] * k).sum(-1) for r in range(rep)], 1) * scaling  # (Hkv, rep, S)
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    in_parts = e[..., :cut].reshape(hkv, rep, parts, size)
    total = in_parts.sum(-1).sum(-1) + e[..., cut:].sum(-1)
    v_parts = v[:, :cut].reshape(hkv, parts, size, d)
    out = torch.stack([(in_parts[:, r, :, :, None] * v_parts).sum(-2) for r in range(rep)], 1).sum(2)
    out = out + torch.stack([(e[:, r, cut:, None] * v[:, cut:]).sum(-2) for r in range(rep)], 1)
    return (out / total[..., None])[None]


def parts_for(n_keys: int) -> int:
    """How many parts a pass over n_keys keys takes: 8, doubled until a part holds at most PARTS_ABOVE
    keys (a power of two, so a growing cache meets few distinct values: one graph each)."""
    parts = 8
    while n_keys > parts * PARTS_ABOVE:
        parts *= 2
    return parts


_compiled = compiled(one_query, dynamic=True)  # dynamic shapes: one compile covers a cache that is still filling
_compiled_in_parts = compiled(one_query_in_parts, dynamic=True)


def parts(n_keys: int, rows: torch.Tensor) -> int:
    """How many parts a pass over n_keys keys runs in: 1 up to PARTS_ABOVE keys, `parts_for` above;
    1 where lminf's C++ kernel runs (it cuts the keys itself: one graph for every length)."""
    return parts_for(n_keys) if n_keys > PARTS_ABOVE and not _on_native(rows) else 1


def compiled_pass(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """`one_query` through torch.compile, in parts over more than PARTS_ABOVE keys; None once
    compiling failed here (the caller then runs torch's fused kernel)."""
    if not compiles():
        return None
    n_parts = parts(keys.shape[-2], rows)
    if n_parts > 1:
        return _compiled_in_parts(rows, keys, values, scaling, n_parts)
    return _compiled(rows, keys, values, scaling)
