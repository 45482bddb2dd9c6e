"""Lambda-shaped attention (LM-Infinite), the fast path that runs everywhere.

For a query at real position i and a key at real position j <= i (keys that are padding
never count):

    local   i - j <  n_local                 normal rotary logit at distance i - j
    global  i - j >= n_local, j <  n_global   rotary logit at distance n_local (the cap)
    middle  i - j >= n_local, j >= n_global   masked, unless it is one of the query
                                              head's `top_k` best middle keys, scored
                                              at distance n_local
    All kept logits share one softmax. A query with no visible key outputs zeros.

    keys ->    g g g . . . . . l l l l q        (n_global = 3, n_local = 5)
    query q    ^^^^^ capped    ^^^^^^^^^ local (q itself included)

The cap is realised with two rotations: the query is rotated from i to n_local and the
key from j to 0, so their dot product is the logit at distance exactly n_local.

global_distance="reindexed" gives the StreamingLLM baseline instead (no cap): a global
key sits where it would inside a [n_global | n_local] cache whose positions are
re-indexed, at distance min(i, n_global + n_local - 1) - j; there is no top-k then.

Queries go in blocks. Each block makes up to three passes, each returning its output and
log-sum-exp, merged exactly as one softmax: the local window (a flash kernel where torch
has one), the capped global keys (at most n_global + padding of them), and the top-k
middle keys. Prefill is O(n * (n_global + n_local)) in time and O(block * n_local) in
extra memory. Top-k scoring reads every middle key (O(n) per query), in chunks.
"""

from __future__ import annotations

import torch

from lminf.layout import Layout
from lminf.rope import rotate, rotation

_KEY_CHUNK = 4096  # middle keys scored at once when picking top-k
# torch's fused CPU attention that also returns the log-sum-exp (an aten op, not public API).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KERNELS = ("auto", "flash_cpu", "torch")
GLOBAL_DISTANCES = ("capped", "reindexed")


def lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    *,
    n_global: int,
    n_local: int,
    top_k: int,
    inv_freq: torch.Tensor,
    scaling: float,
    block_size: int | None = None,
    kernel: str = "auto",
    global_distance: str = "capped",
) -> torch.Tensor:
    """q (B, Hq, Q, D), k and v (B, Hkv, K, D), rotated at their own positions -> (B, Hq, Q, D).

    Keys are in physical order and the queries are the last Q keys (see lminf.layout).
    Grouped-query attention: Hq must be a multiple of Hkv; top-k is chosen per query head.
    kernel: "torch" (plain matmuls), "flash_cpu" (torch's fused CPU kernel), or "auto".
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if global_distance not in GLOBAL_DISTANCES or (global_distance == "reindexed" and top_k):
        raise ValueError(f"global_distance must be one of {GLOBAL_DISTANCES} (reindexed without top_k), got {global_distance!r}.")
    use_flash = kernel == "flash_cpu" or (kernel == "auto" and q.device.type == "cpu" and _FLASH_CPU is not None)
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    offset = K - Q  # key index of query 0
    block = block_size or min(512, max(16, n_local))

    q_pos, k_pos, k_valid = layout.q_pos, layout.k_pos, layout.k_valid
    # Grouped heads become extra query rows: (B, Hkv, rep, Q, D), keys are never repeated.
    q_grouped = q.view(B, Hkv, rep, Q, D)
    # What depends only on positions is the same in every layer: layout.once works it out once per forward.
    n_head, consecutive = layout.once(("windows", K, n_global, n_local), _windows, layout, K, n_global, n_local)
    freqs = id(inv_freq)
    if not (n_head or top_k):
        q_global = k_global = None
    elif global_distance == "capped":  # queries moved to position n_local, head keys to position 0
        q_turn = layout.once(("q to n_local", n_local, freqs), rotation, n_local - q_pos, inv_freq)
        k_turn = layout.once(("head to 0", n_head, freqs), rotation, -k_pos[:, :n_head], inv_freq)
        q_global, k_global = rotate(q, q_turn).view(B, Hkv, rep, Q, D), rotate(k[:, :, :n_head], k_turn)
    else:  # queries moved to their position in a full re-indexed cache; head keys stay where they are
        delta = q_pos.clamp(max=n_global + n_local - 1) - q_pos
        q_turn = layout.once(("q reindexed", n_global, n_local, freqs), rotation, delta, inv_freq)
        q_global, k_global = rotate(q, q_turn).view(B, Hkv, rep, Q, D), k[:, :, :n_head]
    k_zero_all = rotate(k, layout.once(("keys to 0", K, freqs), rotation, -k_pos, inv_freq)) if top_k else None

    out = torch.empty(B, Hkv, rep, Q, D, dtype=q.dtype, device=q.device)
    for a in range(0, Q, block):
        b = min(a + block, Q)
        i = q_pos[:, a:b, None]  # (B, n, 1)
        qb = _rows(q_grouped[:, :, :, a:b])
        qb_global = None if q_global is None else _rows(q_global[:, :, :, a:b])
        parts = []

        s, n = offset + a, b - a  # key index of the block's first query, block length
        lo, hi = max(0, s - n_local + 1), s + n  # the block's window
        if consecutive and n <= n_local:
            # Key index arithmetic is the mask here: most of the window needs none.
            full_lo = max(0, s + n - n_local)
            # Keys that every query of the block sees; decoding (n == 1) sees its own key as well.
            seen_by_all = hi if n == 1 else s
            if seen_by_all > full_lo:
                parts.append(_attend(qb, k[:, :, full_lo:seen_by_all], v[:, :, full_lo:seen_by_all], None, scaling, use_flash))
            if n > 1:
                parts.append(_attend_diagonal(q_grouped[:, :, :, a:b], k[:, :, s:hi], v[:, :, s:hi], scaling, use_flash))
            if full_lo > lo:  # the trailing edge: query t sees key j iff j >= s + t - n_local + 1
                edge = layout.once(("edge", K, a, b, n_local, rep), _edge_mask, B, lo, full_lo, s, n, n_local, rep, q.device)
                parts.append(_attend(qb, k[:, :, lo:full_lo], v[:, :, lo:full_lo], edge, scaling, use_flash))
        else:  # padding: decide each pair from real positions
            local = layout.once(("local", K, a, b, n_local, rep), _local_mask, layout, a, b, lo, hi, n_local, rep)
            parts.append(_attend(qb, k[:, :, lo:hi], v[:, :, lo:hi], local, scaling, use_flash))

        if n_head:
            key = ("capped", a, b, n_head, n_global, n_local, rep)
            capped = layout.once(key, _capped_mask, layout, a, b, n_head, n_global, n_local, rep)
            parts.append(_attend(qb_global, k_global, v[:, :, :n_head], capped, scaling, use_flash))

        mid_hi = offset + b - n_local  # no middle key of this block lies at or past here
        if top_k and mid_hi > 0:
            # From key 0: with padding, a head key can be a middle key of another row.
            parts.append(_top_middle(qb_global, k_zero_all, v, k_pos, k_valid, i, mid_hi, n_global, n_local, top_k, rep, scaling))

        o = _merge(parts)
        out[:, :, :, a:b] = o.view(B, Hkv, rep, b - a, D).to(q.dtype)
    return out.view(B, Hq, Q, D)


def _windows(layout: Layout, K: int, n_global: int, n_local: int) -> tuple[int, bool]:
    """(n_head, consecutive): keys that can be global for some row all sit in [0, n_head)
    (0 when every query is still inside its window); consecutive: no padding, and positions
    consecutive over every query's window, the common case that needs few masks."""
    q_pos, k_pos, k_valid = layout.q_pos, layout.k_pos, layout.k_valid
    maybe_global = (k_valid & (k_pos < n_global)).any(0)
    n_head = int(maybe_global.nonzero().max()) + 1 if bool(maybe_global.any()) else 0
    if int(q_pos.max()) < n_local:
        n_head = 0
    first = max(0, K - q_pos.shape[1] - n_local + 1)  # the first query's window starts here
    steps = torch.arange(K - first, device=k_pos.device)
    consecutive = bool(k_valid.all()) and bool((k_pos[:, first:] == k_pos[:, first : first + 1] + steps).all())
    return n_head, consecutive


def _edge_mask(B, lo, full_lo, s, n, n_local, rep, device):
    j = torch.arange(lo, full_lo, device=device)
    edge = (j[None, :] - (s - n_local + 1) >= torch.arange(n, device=device)[:, None]).expand(B, -1, -1)
    return _rows_mask(edge, rep)


def _local_mask(layout: Layout, a, b, lo, hi, n_local, rep):
    i, j, valid = layout.q_pos[:, a:b, None], layout.k_pos[:, None, lo:hi], layout.k_valid[:, None, lo:hi]
    return _rows_mask(valid & (i - j >= 0) & (i - j < n_local), rep)


def _capped_mask(layout: Layout, a, b, n_head, n_global, n_local, rep):
    """Which head keys each query sees at the cap; None when every query sees all of them."""
    i, j, valid = layout.q_pos[:, a:b, None], layout.k_pos[:, None, :n_head], layout.k_valid[:, None, :n_head]
    capped = valid & (i - j >= n_local) & (j < n_global)
    return None if bool(capped.all()) else _rows_mask(capped, rep)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, rep, n, X) -> (B, Hkv, rep*n, X)"""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _rows_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, n, L) -> (B, 1, rep*n, L), the same mask for every grouped head"""
    B, n, L = mask.shape
    return mask[:, None, None].expand(B, 1, rep, n, L).reshape(B, 1, rep * n, L)


def _attend(q, k, v, mask, scaling, use_flash, causal=False):
    """Softmax attention of q (B, H, M, D) over k, v (B, H, L, D) under a boolean mask
    (B, 1, M, L) or none -> (output (B, H, M, D) float32, log-sum-exp (B, H, M) float32).
    causal: query m sees keys 0..m (M == L)."""
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()[None, None]
    if use_flash:
        bias = None
        if mask is not None and not causal:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -torch.inf)
        o, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=scaling)
        if bias is not None:  # the kernel reports lse 0, not -inf, for a row with no visible key
            lse = torch.where(mask.any(-1), lse, -torch.inf)
        return o.float(), lse.float()
    s = (q @ k.transpose(-1, -2)).float() * scaling
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (p.to(v.dtype) @ v).float(), lse


def _attend_diagonal(q, k, v, scaling, use_flash):
    """The block's own keys, causally: q (B, Hkv, rep, n, D), k and v (B, Hkv, n, D)
    -> (output, lse) as rows (B, Hkv, rep*n, ...)."""
    B, Hkv, rep, n, D = q.shape
    # A causal mask is per head, so the grouped heads cannot be folded into rows here.
    o, lse = _attend(
        q.reshape(B, Hkv * rep, n, D), k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), None, scaling, use_flash, True
    )
    return o.reshape(B, Hkv, rep * n, D), lse.reshape(B, Hkv, rep * n)


def _merge(parts):
    """One softmax over the union of the parts' keys, from each part's (output, lse)."""
    if len(parts) == 1:  # nothing to merge; a row with no visible key gets zeros, not NaN
        o, lse = parts[0]
        return torch.where(torch.isfinite(lse)[..., None], o, 0.0)
    lse = torch.stack([p[1] for p in parts]).logsumexp(dim=0)
    total = torch.where(torch.isfinite(lse), lse, 0.0)
    out = 0.0
    for o, part_lse in parts:
        weight = torch.exp(part_lse - total)  # 0 where the part saw no key
        out = out + torch.where(weight[..., None] > 0, o, 0.0) * weight[..., None]  # flash gives NaN on empty rows
    return out


def _top_middle(qb_capped, k_zero_all, v, k_pos, k_valid, i, hi, n_global, n_local, top_k, rep, scaling):
    """Attention over each query head's best `top_k` middle keys among keys [0, hi),
    scored at distance n_local. Keys are scored in chunks so memory stays bounded."""
    B, Hkv, M, D = qb_capped.shape
    best_s = best_idx = None
    for c in range(0, hi, _KEY_CHUNK):
        d = min(c + _KEY_CHUNK, hi)
        j, valid = k_pos[:, None, c:d], k_valid[:, None, c:d]
        middle = _rows_mask(valid & (i - j >= n_local) & (j >= n_global), rep)  # (B, 1, M, L)
        s = (qb_capped @ k_zero_all[:, :, c:d].transpose(-1, -2)).float() * scaling
        s = s.masked_fill(~middle, -torch.inf)
        idx = torch.arange(c, d, device=s.device).expand_as(s)
        if best_s is not None:
            s, idx = torch.cat((best_s, s), -1), torch.cat((best_idx, idx), -1)
        best_s, pick = s.topk(min(top_k, s.shape[-1]), dim=-1)
        best_idx = idx.gather(-1, pick)
    lse = torch.logsumexp(best_s, dim=-1)
    p = torch.exp(best_s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # (B, Hkv, M, k)
    v_mid = v.gather(2, best_idx.reshape(B, Hkv, -1, 1).expand(-1, -1, -1, D)).view(B, Hkv, M, -1, D)
    return torch.einsum("bhmk,bhmkd->bhmd", p, v_mid.float()), lse
