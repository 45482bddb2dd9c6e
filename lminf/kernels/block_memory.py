"""Attention with a block memory (InfLLM, Xiao et al. 2024, arXiv 2402.04617), on the frame
of LM-Infinite: for a query at position i and an earlier key at position j,

    local    i - j <  n_local                        normal rotary logit at distance i - j
    initial  i - j >= n_local, j < n_global           logit at the capped distance n_local
    memory   i - j >= n_local, j in a block that      capped too, if the block is one of the
             lies wholly outside the window           query's `top_blocks` best (all of them
                                                      while there are no more than that)
    edge     i - j >= n_local, j in the block the     capped too, always (fewer than one
             window is leaving                        block of them: nothing is skipped)
    All kept logits share one softmax.

Blocks are `block_size` tokens on a fixed grid from position n_global: block c holds
[n_global + c * block_size, n_global + (c + 1) * block_size), and is in memory for every
query from n_global + n_local + (c + 1) * block_size - 1 on. Its representative vector, per
query head, is the mean of its `repr_topk` keys that received the most attention (summed
probability) from the queries that saw them in their window; all those queries come before
the block enters memory, so this is causal and does not depend on how the input is split
into calls. A block's score for a query is the query's capped logit against that vector,
summed over heads; one choice of blocks per query, shared by its heads (as InfLLM does).

InfLLM chooses blocks once per chunk of 512 queries from their mean query, which lets a
query's attention depend on later queries of its chunk; here each query chooses its own,
so that the result is causal and decoding equals one forward. Queries go in groups between
two points where a block enters memory; a group attends to the union of its queries'
blocks under a mask, read from the hot-block cache at most `hot` blocks at a time.

Keys are placed at position 0 once (memory blocks are stored placed), queries at n_local.
"""

from __future__ import annotations

import torch

from lminf.kernels.sdpa import alibi_bias, attend, capped, merge, rows, rows_mask, softmax_lse, use_flash, wide
from lminf.layout import Layout
from lminf.rope import rotate, rotation


def block_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    memory,
    *,
    n_global: int,
    n_local: int,
    block_size: int,
    top_blocks: int,
    repr_topk: int,
    inv_freq: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    interleaved: bool = False,
    alibi: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """q (B, Hq, Q, D), k and v (B, Hkv, K, D) as `memory` (a lminf.caches.BlockMemoryLayer
    after its update) returned them -> (B, Hq, Q, D). Updates the memory: attention masses,
    new blocks, recent tokens dropped. alibi: ALiBi slopes (Hq,) of a layer without rotary
    positions (MPT): -slope * distance on every logit, the capped distance outside the window."""

    def seen_as(seen: torch.Tensor, distance: torch.Tensor | int) -> torch.Tensor:
        """Which pairs a pass sees, (B or 1, n, L), as its mask, or as ALiBi's bias at `distance`."""
        seen = seen.expand(B, -1, -1)
        if alibi is None:
            return rows_mask(seen, rep)
        return alibi_bias(torch.as_tensor(distance, device=seen.device).expand(seen.shape), seen, alibi, rep)

    flash = use_flash(kernel, q.device)
    B, Hq, Q, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    p0 = int(layout.q_pos[0, 0])
    total, S, R0 = p0 + Q, memory.n_stored_sinks(), memory.recent_start
    layout.once(("block memory layout", S, R0), _check_layout, layout, S, R0)

    def phys(p: int) -> int:  # physical index of the key at position p
        return p if p < S else S + p - R0

    last_far = total - 1 - n_local  # the last position any query of this call reads capped
    n_place = max(S, phys(last_far) + 1) if last_far >= 0 else 0  # the first tokens, and recent ones read capped
    k_placed = q_far = None
    if n_place:
        k_placed, q_far = k[:, :, :n_place], q
        if inv_freq is not None:
            exact = wide(q[..., :0]).dtype
            delta = -layout.k_pos[:, :n_place]
            k_placed = rotate(k_placed, rotation(delta, inv_freq, interleaved, exact), interleaved)
            q_far = rotate(q, rotation(n_local - layout.q_pos, inv_freq, interleaved, exact), interleaved)
    mass = memory.masses(Hq)
    q_grouped = q.view(B, Hkv, rep, Q, D)
    out = torch.empty_like(q_grouped)
    first_block_at = n_global + n_local - 1  # blocks enter memory at first_block_at + m * block_size

    a = p0
    while a < total:
        b = min(total, a + block_size - (a - first_block_at) % block_size)
        m = max(0, (a - first_block_at) // block_size)  # blocks in memory for every query of [a, b)
        while memory.n_blocks < m:
            _form_block(memory, k, k_placed, v, mass, phys, n_global, block_size, repr_topk, rep)
        ia, ib = a - p0, b - p0
        qb = rows(q_grouped[:, :, :, ia:ib])
        # What depends on positions only is the same in every layer: worked out once per forward.
        key = ("block memory group", a, b, S, R0, m)
        lo, hi, d, far = layout.once(key, _group, layout, a, b, m, phys, S, n_global, n_local, block_size)
        if softcap is None:  # the scale on the few queries, not on the many logits
            s = wide((qb * scaling) @ k[:, :, lo:hi].transpose(-1, -2))
        else:
            s = capped(wide(qb @ k[:, :, lo:hi].transpose(-1, -2)) * scaling, softcap)
        if alibi is None:
            for cols, hidden in layout.once((*key, "hidden", B, rep), _hidden, seen_as, d, n_local):
                s[..., cols].masked_fill_(hidden, -torch.inf)
        else:
            s = s + seen_as(((d >= 0) & (d < n_local))[None], d[None])
        p, lse = softmax_lse(s)  # every query sees itself: no empty row
        parts = [(wide(p.to(v.dtype) @ v[:, :, lo:hi]), lse)]

        qb_far = None if q_far is None else rows(q_far.view(B, Hkv, rep, Q, D)[:, :, :, ia:ib])
        if far is not None:  # initial tokens and the edge, capped
            index, seen = far
            mask = (
                layout.once((*key, "far", B, rep), seen_as, seen[None], n_local)
                if alibi is None
                else seen_as(seen[None], n_local)
            )
            parts.append(attend(qb_far, k_placed[:, :, index], v[:, :, index], mask, scaling, flash, softcap=softcap))
        if m and top_blocks:
            q_group = q_far.view(B, Hkv, rep, Q, D)[:, :, :, ia:ib]
            parts += _memory_parts(
                memory, q_group, m, top_blocks, block_size, scaling, flash, softcap, seen_as, n_local, k, alibi is not None
            )

        out[:, :, :, ia:ib] = merge(parts).view(B, Hkv, rep, b - a, D).to(q.dtype)
        total_lse = torch.stack([part[1] for part in parts]).logsumexp(dim=0)
        # The attention each window key received, for the representatives of its block.
        weight = torch.exp(lse - total_lse).view(B, Hkv, rep, 1, b - a)  # each row's share of its softmax
        received = (weight @ p.view(B, Hkv, rep, b - a, -1)).view(B, Hq, -1)
        if hi > S:  # first tokens never go into blocks: only recent ones are scored
            start = max(lo, S)
            mass[:, :, start - S : hi - S] += received[:, :, start - lo :]
        a = b

    memory.drop_recent(n_global + memory.n_blocks * block_size)
    return out.view(B, Hq, Q, D)


def _hidden(seen_as, d: torch.Tensor, n_local: int) -> list[tuple[slice, torch.Tensor]]:
    """The window pass's pairs a query does not see, as grouped rows, for the columns where
    any is hidden: [(columns, mask)], the trailing edge and the queries' own block (the
    middle of the window, seen by all, needs no pass), or one mask over all columns."""
    hidden = ~seen_as(((d >= 0) & (d < n_local))[None], d[None])
    some = hidden.flatten(0, -2).any(0).tolist()
    left = next((c for c, h in enumerate(some) if not h), len(some))  # columns [0, left) may hide
    right = len(some) - next((c for c, h in enumerate(reversed(some)) if not h), 0)  # and [right, end)
    if any(some[left:right]):
        return [(slice(None), hidden)]
    return [(cols, hidden[..., cols]) for cols in (slice(0, left), slice(right, len(some))) if cols.start < cols.stop]


def _group(layout: Layout, a: int, b: int, m: int, phys, S: int, n_global: int, n_local: int, block_size: int):
    """Queries [a, b) with m blocks in memory -> (lo, hi): physical keys of their window, d: the
    distances (b - a, hi - lo), far: (physical index, seen (b - a, n)) of the first tokens and the
    edge they read capped, or None when none of them reads any."""
    i = torch.arange(a, b, device=layout.k_pos.device)
    lo, hi = phys(max(0, a - n_local + 1)), phys(b - 1) + 1
    d = i[:, None] - layout.k_pos[0, lo:hi][None, :]
    if b - 1 - n_local < 0:
        return lo, hi, d, None
    e0, e1 = phys(n_global + m * block_size), phys(b - 1 - n_local) + 1
    index = torch.cat((torch.arange(S, device=i.device), torch.arange(e0, max(e0, e1), device=i.device)))
    if not len(index):  # no first tokens (n_global 0) and no edge
        return lo, hi, d, None
    return lo, hi, d, (index, i[:, None] - layout.k_pos[0, index][None, :] >= n_local)


def _check_layout(layout: Layout, S: int, R0: int) -> None:
    """The keys must be the cache's [first S | recent from R0], with no padding."""
    if not bool(layout.k_valid.all()):
        raise ValueError("a block memory does not support padded batches: run rows of different lengths one at a time.")
    total = int(layout.q_pos[0, -1]) + 1
    device = layout.k_pos.device
    expected = torch.cat((torch.arange(S, device=device), torch.arange(min(R0, total), total, device=device)))
    q_expected = torch.arange(total - layout.q_pos.shape[1], total, device=device)
    same = layout.k_pos.shape[1] == len(expected) and bool((layout.k_pos == expected).all())
    if not (same and bool((layout.q_pos == q_expected).all())):
        raise RuntimeError("infllm: the keys are not the ones its cache keeps; please report this.")


def _form_block(memory, k, k_placed, v, mass, phys, n_global: int, block_size: int, repr_topk: int, rep: int) -> None:
    """Cut the next block out of the recent tokens: its keys (placed), values and representatives."""
    c, S = memory.n_blocks, memory.n_stored_sinks()
    lo = phys(n_global + c * block_size)
    hi = lo + block_size
    keys = k_placed[:, :, lo:hi]
    best = mass[:, :, lo - S : hi - S].topk(repr_topk, dim=-1).indices  # (B, Hq, r)
    per_head = keys.repeat_interleave(rep, 1)  # (B, Hq, block, D)
    picked = per_head.gather(2, best[..., None].expand(-1, -1, -1, keys.shape[-1]))
    memory.add_block(torch.stack((keys, v[:, :, lo:hi])), wide(picked).mean(2).to(k.dtype))


def _memory_parts(
    memory, q_far, m: int, top_blocks: int, block_size: int, scaling, flash, softcap, seen_as, n_local, like, biased
):
    """The passes of a group (q_far (B, Hkv, rep, n, D), placed) over its queries' chosen blocks."""
    B, Hkv, rep, n, D = q_far.shape
    reps = wide(memory.reps[:, :, :m])  # (B, Hq, m, D)
    score = torch.einsum("bhnd,bhmd->bnm", wide(q_far.reshape(B, Hkv * rep, n, D)), reps)
    if m > top_blocks:
        chosen = torch.zeros(B, n, m, dtype=torch.bool, device=q_far.device)
        chosen.scatter_(-1, score.topk(top_blocks, dim=-1).indices, True)
    else:
        chosen = torch.ones(B, n, m, dtype=torch.bool, device=q_far.device)
    union = chosen.flatten(0, 1).any(0).nonzero().flatten().tolist()
    if n * len(union) > top_blocks * n + BLOCK_OVERHEAD * len(union):
        return [_chosen_blocks_only(memory, q_far, chosen, union, block_size, scaling, softcap, seen_as, n_local, like, biased)]
    qb, parts = rows(q_far), []
    for c in range(0, len(union), memory.store.hot):  # as many blocks at a time as the hot cache holds
        blocks = union[c : c + memory.store.hot]
        keys, values, block_in = memory.store.load(blocks, like)  # every hot slot, read under a mask
        if n >= GATHER_FROM:  # enough queries to pay for copying out only this batch's blocks
            at = torch.tensor([memory.store.slot_of[b] for b in blocks], device=q_far.device)[:, None] * block_size
            index = (at + torch.arange(block_size, device=q_far.device)).flatten()
            seen = chosen[:, :, blocks].repeat_interleave(block_size, dim=-1)
            parts.append(
                attend(qb, keys[:, :, index], values[:, :, index], seen_as(seen, n_local), scaling, False, softcap=softcap)
            )
            continue
        now = torch.zeros(m + 1, dtype=torch.bool, device=q_far.device)  # index m: an empty slot
        now[blocks] = True
        slot = torch.where(block_in >= 0, block_in, m)
        seen = torch.cat((chosen, now[None, None, -1:].expand(B, n, 1)), -1)[:, :, slot] & now[slot]  # (B, n, hot)
        seen = seen.repeat_interleave(block_size, dim=-1)  # (B, n, hot * block)
        # Plain matmuls: the fused kernel is slower here under a mask that hides half the keys (measured).
        parts.append(attend(qb, keys, values, seen_as(seen, n_local), scaling, False, softcap=softcap))
    return parts


# A group reads block by block, each block against only the queries that chose it, when that
# saves more than it costs: the masked pass over the union does n * len(union) query-block
# pairs, block by block does n * top_blocks plus a fixed cost per block, worth about
# BLOCK_OVERHEAD pairs (estimated on CPU: ~120 us of calls per block against ~3 us per pair;
# 10, 20 and 40 timed alike within noise on 6k-8k prefills). Prefill chunks gain; a decoding
# step (one query) reads the union.
BLOCK_OVERHEAD = 40
GATHER_FROM = 8  # queries from which the union pass copies its blocks out rather than read every hot slot


def _chosen_blocks_only(memory, q_far, chosen, union, block_size: int, scaling, softcap, seen_as, n_local, like, biased):
    """A group's memory pass, block by block: each block against only the queries that chose it
    (their top_blocks, not the whole union), the partial softmaxes merged per query by lse.
    -> (output, lse) as grouped rows, one part."""
    B, Hkv, rep, n, D = q_far.shape
    choice = chosen.cumsum(-1) - 1  # which of its choices a block is for a query
    width = int(chosen.sum(-1).max())
    exact = wide(q_far[..., :0]).dtype
    outs = torch.zeros(B, Hkv, rep, n, width, D, dtype=exact, device=q_far.device)
    lses = torch.full((B, Hkv, rep, n, width), -torch.inf, dtype=exact, device=q_far.device)
    for c in range(0, len(union), memory.store.hot):
        blocks = union[c : c + memory.store.hot]
        keys, values, _ = memory.store.load(blocks, like)
        for block in blocks:
            at = memory.store.slot_of[block] * block_size
            for b in range(B):
                who = chosen[b, :, block].nonzero().flatten()
                if not len(who):
                    continue
                seen = torch.ones(1, len(who), block_size, dtype=torch.bool, device=q_far.device)
                o, lse = attend(
                    rows(q_far[b : b + 1, :, :, who]),
                    keys[b : b + 1, :, at : at + block_size],
                    values[b : b + 1, :, at : at + block_size],
                    seen_as(seen, n_local)[:1] if biased else None,  # ALiBi: the capped distance's bias
                    scaling,
                    False,
                    softcap=softcap,
                )
                j = choice[b, who, block]
                outs[b, :, :, who, j] = o.view(Hkv, rep, len(who), D)
                lses[b, :, :, who, j] = lse.view(Hkv, rep, len(who))
    lse = lses.logsumexp(-1)
    weight = torch.exp(lses - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = (weight[..., None] * outs).sum(-2)
    return rows(out), lse.reshape(B, Hkv, rep * n)
