"""A window of recent keys plus a few far keys read at chosen positions, blockwise: the
Lambda shape of LM-Infinite and of its relatives (StreamingLLM's sinks).

For a query at real position i and a key at real position j <= i (keys that are padding
never count):

    local   i - j <  n_local                 normal rotary logit at distance i - j
    far     i - j >= n_local, j <  n_global   rotary logit with the query placed at q_at and
                                              the key at k_at, as `far(q_pos, k_pos)` says
    middle  i - j >= n_local, j >= n_global   masked, unless it is one of the query head's
                                              `top_k` best middle keys, placed like far keys
    All kept logits share one softmax. A query with no visible key outputs zeros.

    keys ->    g g g . . . . . l l l l q        (n_global = 3, n_local = 5)
    query q    ^^^^^ far       ^^^^^^^^^ local (q itself included)

Queries and keys arrive rotated at their own positions; placing them elsewhere is one
more rotation of each by the position delta (`k_at` None: keys stay where they are).
LM-Infinite places the query at n_local and the key at 0, so the distance is capped.

Queries go in blocks. Each block makes up to three kinds of passes, each returning its
output and log-sum-exp, merged exactly as one softmax (lminf.kernels.sdpa): the local
window, the far keys (at most n_global + padding of them), and the top-k middle keys.
Prefill is O(n * (n_global + n_local)) in time and O(block * n_local) in extra memory.
Top-k scoring reads every middle key (O(n) per query), in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lminf.kernels.sdpa import alibi_bias, attend, attend_causal_grouped, merge, rows, rows_mask, use_flash
from lminf.kernels.topk import top_k_attention
from lminf.layout import Layout
from lminf.rope import rotate, rotation

if TYPE_CHECKING:
    from lminf.strategies.base import AttentionCall

# (q_pos (B, Q), k_pos (B, K)) -> (q_at (B, Q), k_at (B, K) or None): where far pairs are read.
# It must be hashable (a bound method of a frozen dataclass is): per-forward work is memoized by it.
Far = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class TopK:
    """Each query head also reads its `k` best middle keys (scored at the placed distance)."""

    k: int
    far: Far | None = None  # where picked pairs are read; None: where the first tokens are (`far`)
    last_row: bool = False  # only the call's last query picks (the original code's rule)
    all_or_none: bool = False  # a query with fewer middle keys than k picks none


def lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    call: AttentionCall,
    *,
    n_global: int,
    n_local: int,
    far: Far,
    top_k: TopK | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """q (B, Hq, Q, D), k and v (B, Hkv, K, D), rotated at their own positions -> (B, Hq, Q, D).

    Keys are in physical order and the queries are the last Q keys (see lminf.layout).
    Grouped-query attention: Hq must be a multiple of Hkv; top-k is chosen per query head.
    From `call`: kernel "torch" (plain matmuls), "flash_cpu" (torch's fused CPU kernel) or
    "auto" ("compiled" is "auto" here); inv_freq None: a position-free layer, far and middle
    keys are read without any rotation; softcap: the model's logit soft-capping (Gemma 2);
    interleaved: GPT-J's rotary pairs (2f, 2f + 1); alibi: ALiBi slopes (Hq,) of a layer
    without rotary positions (MPT): every kept logit gets -slope * its distance, the placed
    one for far and middle keys.
    """
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    offset = K - Q  # key index of query 0
    block = block_size or min(512, max(16, n_local))
    if top_k is not None and not top_k.k:
        top_k = None
    top_k_far = far if top_k is None or top_k.far is None else top_k.far
    # What depends only on positions is the same in every layer: layout.once works it out once per forward.
    n_lead, consecutive = layout.once(("windows", K, n_global, n_local), _windows, layout, K, n_global, n_local)
    q_far, k_lead, k_all, q_top = _far_views(q, k, layout, call, far, top_k_far, n_lead, top_k is not None)

    def grouped(x: torch.Tensor, a: int, b: int) -> torch.Tensor:  # queries [a, b) as grouped rows
        return rows(x.view(B, Hkv, rep, Q, D)[:, :, :, a:b])

    out = torch.empty(B, Hkv, rep, Q, D, dtype=q.dtype, device=q.device)
    for a in range(0, Q, block):
        b = min(a + block, Q)
        qb = q.view(B, Hkv, rep, Q, D)[:, :, :, a:b]
        parts = _window_parts(qb, k, v, layout, a, offset, n_local, consecutive, call)
        if n_lead:
            parts.append(_far_part(grouped(q_far, a, b), k_lead, v[:, :, :n_lead], layout, a, b, n_global, n_local, far, call))
        mid_hi = offset + b - n_local  # no middle key of this block lies at or past here
        if top_k is not None and mid_hi > 0 and not (top_k.last_row and b < Q):
            shape = (a, b, Q, n_global, n_local)
            parts.append(_top_k_part(grouped(q_top, a, b), k_all, v, layout, shape, mid_hi, top_k, top_k_far, call))
        out[:, :, :, a:b] = merge(parts).view(B, Hkv, rep, b - a, D).to(q.dtype)
    return out.view(B, Hq, Q, D)


def _far_part(qb, k_lead, v_lead, layout: Layout, a: int, b: int, n_global: int, n_local: int, far: Far, call: AttentionCall):
    """The pass of queries [a, b) (placed, as grouped rows) over the leading keys they read as far keys."""
    n_lead, rep = k_lead.shape[2], qb.shape[2] // (b - a)
    flash = use_flash(call.kernel, qb.device)
    shape = (a, b, n_lead, n_global, n_local, rep)
    mask = layout.once(("far", *shape), _far_mask, layout, *shape)
    if call.alibi is not None:
        q_at, k_at = layout.once(("far at", far, n_lead), far, layout.q_pos, layout.k_pos[:, :n_lead])
        distance = q_at[:, a:b, None] - (layout.k_pos[:, :n_lead] if k_at is None else k_at)[:, None, :]
        mask = alibi_bias(distance, _far_seen(layout, a, b, n_lead, n_global, n_local), call.alibi, rep)
    return attend(qb, k_lead, v_lead, mask, call.scaling, flash, softcap=call.softcap)


def _top_k_part(qb, k_all, v, layout: Layout, shape, mid_hi: int, top_k: TopK, top_k_far: Far, call: AttentionCall):
    """The pass of queries [a, b) (placed for top-k, as grouped rows) over each query head's
    `top_k.k` best middle keys; shape: (a, b, Q, n_global, n_local). From key 0: with
    padding, a leading key can be a middle key of another row."""
    a, b, Q, n_global, n_local = shape
    rep = qb.shape[2] // (b - a)

    def middle(c: int, d: int) -> torch.Tensor:
        i, j, valid = layout.q_pos[:, a:b, None], layout.k_pos[:, None, c:d], layout.k_valid[:, None, c:d]
        picks = valid & (i - j >= n_local) & (j >= n_global)
        if top_k.last_row:  # the other rows of the block pick nothing
            picks = picks & (torch.arange(a, b, device=picks.device) == Q - 1)[None, :, None]
        return picks

    def placed_bias(c: int, d: int) -> torch.Tensor:  # ALiBi: middle keys are read at the placed distance
        q_at, k_at = layout.once(("far at all", top_k_far), top_k_far, layout.q_pos, layout.k_pos)
        distance = q_at[:, a:b, None] - (layout.k_pos if k_at is None else k_at)[:, None, c:d]
        return alibi_bias(distance, torch.ones_like(distance, dtype=torch.bool), call.alibi, rep)

    bias = None if call.alibi is None else placed_bias
    return top_k_attention(qb, k_all, v, middle, mid_hi, top_k.k, rep, call.scaling, call.softcap, bias, top_k.all_or_none)


def _far_views(q, k, layout: Layout, call: AttentionCall, far: Far, top_k_far: Far, n_lead: int, top_k: bool):
    """(queries placed where they read far keys, the leading keys placed, all keys placed
    for top-k, queries placed for top-k), each None when nothing needs it. Without rotary
    positions (inv_freq None) placing changes nothing: a NoPE logit does not depend on the distance."""
    if not (n_lead or top_k):
        return None, None, None, None
    if call.inv_freq is None:
        return q, k[:, :, :n_lead], k, q
    inv_freq, interleaved = call.inv_freq, call.interleaved
    freqs, q_pos, k_pos = id(inv_freq), layout.q_pos, layout.k_pos
    q_at, k_at = layout.once(("far at", far, n_lead), far, q_pos, k_pos[:, :n_lead])

    def placed(x, name, delta, where=far):  # x rotated by delta, with the rotation table worked out once per forward
        return rotate(
            x, layout.once((name, where, n_lead, freqs, interleaved), rotation, delta, inv_freq, interleaved), interleaved
        )

    q_far = placed(q, "far q", q_at - q_pos)
    k_lead = k[:, :, :n_lead] if k_at is None else placed(k[:, :, :n_lead], "far lead", k_at - k_pos[:, :n_lead])
    k_all = q_top = None
    if top_k:
        q_top_at, k_all_at = layout.once(("far at all", top_k_far), top_k_far, q_pos, k_pos)
        k_all = k if k_all_at is None else placed(k, "far all", k_all_at - k_pos, top_k_far)
        q_top = q_far if top_k_far is far else placed(q, "top q", q_top_at - q_pos, top_k_far)
    return q_far, k_lead, k_all, q_top


def _window_parts(q_block, k, v, layout: Layout, a, offset, n_local: int, consecutive: bool, call: AttentionCall):
    """The passes of queries [a, a + n) (q_block (B, Hkv, rep, n, D)) over their local windows."""
    B, _, rep, n, _ = q_block.shape
    K = k.shape[2]
    qb = rows(q_block)
    scaling, softcap, alibi = call.scaling, call.softcap, call.alibi
    flash = use_flash(call.kernel, q_block.device)
    s = offset + a  # key index of the block's first query
    lo, hi = max(0, s - n_local + 1), s + n  # the block's window
    if alibi is not None:  # ALiBi: a bias for every pair (not memoized: it is per head and large)
        i, j = layout.q_pos[:, a : a + n, None], layout.k_pos[:, None, lo:hi]
        seen = layout.k_valid[:, None, lo:hi] & (i - j >= 0) & (i - j < n_local)
        return [attend(qb, k[:, :, lo:hi], v[:, :, lo:hi], alibi_bias(i - j, seen, alibi, rep), scaling, flash, softcap=softcap)]
    if not (consecutive and n <= n_local):  # padding: decide each pair from real positions
        local = layout.once(("local", K, a, a + n, n_local, rep), _local_mask, layout, a, a + n, lo, hi, n_local, rep)
        return [attend(qb, k[:, :, lo:hi], v[:, :, lo:hi], local, scaling, flash, softcap=softcap)]
    # Key index arithmetic is the mask here: most of the window needs none.
    parts = []
    full_lo = max(0, s + n - n_local)
    seen_by_all = hi if n == 1 else s  # keys every query of the block sees; decoding (n == 1) sees its own as well
    if seen_by_all > full_lo:
        parts.append(
            attend(qb, k[:, :, full_lo:seen_by_all], v[:, :, full_lo:seen_by_all], None, scaling, flash, softcap=softcap)
        )
    if n > 1:
        parts.append(attend_causal_grouped(q_block, k[:, :, s:hi], v[:, :, s:hi], scaling, flash, softcap))
    if full_lo > lo:  # the trailing edge: query t sees key j iff j >= s + t - n_local + 1
        edge = layout.once(("edge", K, a, a + n, n_local, rep), _edge_mask, B, lo, full_lo, s, n, n_local, rep, q_block.device)
        parts.append(attend(qb, k[:, :, lo:full_lo], v[:, :, lo:full_lo], edge, scaling, flash, softcap=softcap))
    return parts


def _windows(layout: Layout, K: int, n_global: int, n_local: int) -> tuple[int, bool]:
    """(n_lead, consecutive): keys that can be far keys for some row all sit in [0, n_lead)
    (0 when every query is still inside its window); consecutive: no padding, and positions
    consecutive over every query's window, the common case that needs few masks."""
    q_pos, k_pos, k_valid = layout.q_pos, layout.k_pos, layout.k_valid
    maybe_far = (k_valid & (k_pos < n_global)).any(0)
    n_lead = int(maybe_far.nonzero().max()) + 1 if bool(maybe_far.any()) else 0
    if int(q_pos.max()) < n_local:
        n_lead = 0
    first = max(0, K - q_pos.shape[1] - n_local + 1)  # the first query's window starts here
    steps = torch.arange(K - first, device=k_pos.device)
    consecutive = bool(k_valid.all()) and bool((k_pos[:, first:] == k_pos[:, first : first + 1] + steps).all())
    return n_lead, consecutive


def _edge_mask(B, lo, full_lo, s, n, n_local, rep, device):
    j = torch.arange(lo, full_lo, device=device)
    edge = (j[None, :] - (s - n_local + 1) >= torch.arange(n, device=device)[:, None]).expand(B, -1, -1)
    return rows_mask(edge, rep)


def _local_mask(layout: Layout, a, b, lo, hi, n_local, rep):
    i, j, valid = layout.q_pos[:, a:b, None], layout.k_pos[:, None, lo:hi], layout.k_valid[:, None, lo:hi]
    return rows_mask(valid & (i - j >= 0) & (i - j < n_local), rep)


def _far_seen(layout: Layout, a, b, n_lead, n_global, n_local) -> torch.Tensor:
    """(B, b - a, n_lead): which leading keys each query of the block reads as far keys."""
    i, j, valid = layout.q_pos[:, a:b, None], layout.k_pos[:, None, :n_lead], layout.k_valid[:, None, :n_lead]
    return valid & (i - j >= n_local) & (j < n_global)


def _far_mask(layout: Layout, a, b, n_lead, n_global, n_local, rep):
    """Which leading keys each query reads as far keys; None when every query reads all of them."""
    far = _far_seen(layout, a, b, n_lead, n_global, n_local)
    return None if bool(far.all()) else rows_mask(far, rep)
