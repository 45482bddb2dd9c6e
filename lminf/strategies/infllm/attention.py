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

from typing import TYPE_CHECKING

import torch

from lminf.kernels.sdpa import alibi_bias, attend, merge, rows, rows_mask, softcapped, softmax_lse, use_flash, wide
from lminf.layout import Layout
from lminf.rope import rotate, rotation

if TYPE_CHECKING:
    from lminf.strategies.base import AttentionCall
    from lminf.strategies.infllm import InfLLM
    from lminf.strategies.infllm.memory import BlockMemoryLayer


# A group reads block by block, each block against only the queries that chose it, when that
# saves more than it costs: the masked pass over the union does n * len(union) query-block
# pairs, block by block does n * top_blocks plus a fixed cost per block, worth about
# BLOCK_OVERHEAD pairs on CPU (the choice is not sensitive to it: 10 to 40 time alike).
# Prefill chunks gain; a decoding step (one query) reads the union.
BLOCK_OVERHEAD = 40
GATHER_FROM = 8  # queries from which the union pass copies its blocks out rather than read every hot slot


def block_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    memory: BlockMemoryLayer,
    call: AttentionCall,
    settings: InfLLM,
) -> torch.Tensor:
    """q (B, Hq, Q, D), k and v (B, Hkv, K, D) as `memory` returned them after its update ->
    (B, Hq, Q, D). Updates the memory: attention masses, new blocks, recent tokens dropped.
    With ALiBi slopes in `call` (a layer without rotary positions, MPT), every logit gets
    -slope * distance, the capped distance outside the window."""
    run = _Run(q, k, v, layout, memory, call, settings)
    n_global, n_local, block_size = settings.n_global, settings.n_local, settings.block_size
    first_block_at = n_global + n_local - 1  # blocks enter memory at first_block_at + m * block_size
    out = torch.empty_like(run.q_grouped)
    a = run.p0
    while a < run.total:
        b = min(run.total, a + block_size - (a - first_block_at) % block_size)
        m = max(0, (a - first_block_at) // block_size)  # blocks in memory for every query of [a, b)
        while memory.n_blocks < m:
            run.form_block()
        out[:, :, :, a - run.p0 : b - run.p0] = run.group(a, b, m)
        a = b
    memory.drop_recent(n_global + memory.n_blocks * block_size)
    return out.view(q.shape)


class _Run:
    """One layer's call: its inputs, and what every group of its queries shares."""

    def __init__(self, q, k, v, layout: Layout, memory: BlockMemoryLayer, call: AttentionCall, settings: InfLLM):
        self.q, self.k, self.v, self.layout, self.memory, self.call, self.settings = q, k, v, layout, memory, call, settings
        B, Hq, Q, D = q.shape
        self.rep = Hq // k.shape[1]
        self.q_grouped = q.view(B, k.shape[1], self.rep, Q, D)
        self.flash = use_flash(call.kernel, q.device)
        self.p0 = int(layout.q_pos[0, 0])
        self.total, self.S, self.R0 = self.p0 + Q, memory.n_stored_global(), memory.recent_start
        layout.once(("block memory layout", self.S, self.R0), _check_layout, layout, self.S, self.R0)
        self.k_placed, self.q_far = self._placed()
        self.mass = memory.masses(Hq)

    def phys(self, p: int) -> int:
        """Physical index of the key at position p."""
        return p if p < self.S else self.S + p - self.R0

    def seen_as(self, seen: torch.Tensor, distance: torch.Tensor | int) -> torch.Tensor:
        """Which pairs a pass sees, (B or 1, n, L), as its mask, or as ALiBi's bias at `distance`."""
        seen = seen.expand(self.q.shape[0], -1, -1)
        if self.call.alibi is None:
            return rows_mask(seen, self.rep)
        return alibi_bias(torch.as_tensor(distance, device=seen.device).expand(seen.shape), seen, self.call.alibi, self.rep)

    def _placed(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the keys read capped, placed at position 0: the first tokens and the recent ones
        any query of this call reads capped; the queries placed at n_local), None for none."""
        q, k, layout, call = self.q, self.k, self.layout, self.call
        last_far = self.total - 1 - self.settings.n_local  # the last position any query of this call reads capped
        n_place = max(self.S, self.phys(last_far) + 1) if last_far >= 0 else 0
        if not n_place:
            return None, None
        if call.inv_freq is None:
            return k[:, :, :n_place], q
        exact = wide(q[..., :0]).dtype
        delta = -layout.k_pos[:, :n_place]
        k_placed = rotate(k[:, :, :n_place], rotation(delta, call.inv_freq, call.interleaved, exact), call.interleaved)
        q_at = self.settings.n_local - layout.q_pos
        return k_placed, rotate(q, rotation(q_at, call.inv_freq, call.interleaved, exact), call.interleaved)

    def group(self, a: int, b: int, m: int) -> torch.Tensor:
        """The output of queries [a, b), which have m blocks in memory, (B, Hkv, rep, b - a, D);
        scores their window keys for the representatives of the blocks to come."""
        B, Hkv, rep, _, D = self.q_grouped.shape
        ia, ib = a - self.p0, b - self.p0
        # What depends on positions only is the same in every layer: worked out once per forward.
        key = ("block memory group", a, b, self.S, self.R0, m)
        s = self.settings
        lo, hi, d, far = self.layout.once(
            key, _group, self.layout, a, b, m, self.phys, self.S, s.n_global, s.n_local, s.block_size
        )
        p, lse = self._window(rows(self.q_grouped[:, :, :, ia:ib]), key, lo, hi, d)
        parts = [(wide(p.to(self.v.dtype) @ self.v[:, :, lo:hi]), lse)]
        if far is not None:  # initial tokens and the edge, capped
            parts.append(self._far(rows(self.q_far.view(self.q_grouped.shape)[:, :, :, ia:ib]), key, far))
        if m and s.top_blocks:
            parts += self._memory_parts(self.q_far.view(self.q_grouped.shape)[:, :, :, ia:ib], m)
        self._score(p, lse, parts, lo, hi)
        return merge(parts).view(B, Hkv, rep, b - a, D).to(self.q.dtype)

    def _window(self, qb: torch.Tensor, key: tuple, lo: int, hi: int, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, lse) of grouped query rows over their window's keys [lo, hi) at distances d."""
        k, scaling, softcap, n_local = self.k[:, :, lo:hi], self.call.scaling, self.call.softcap, self.settings.n_local
        if softcap is None:  # the scale on the few queries, not on the many logits
            s = wide((qb * scaling) @ k.transpose(-1, -2))
        else:
            s = softcapped(wide(qb @ k.transpose(-1, -2)) * scaling, softcap)
        if self.call.alibi is None:
            for cols, hidden in self.layout.once((*key, "hidden", qb.shape[0], self.rep), _hidden, self.seen_as, d, n_local):
                s[..., cols].masked_fill_(hidden, -torch.inf)
        else:
            s = s + self.seen_as(((d >= 0) & (d < n_local))[None], d[None])
        return softmax_lse(s)  # every query sees itself: no empty row

    def _far(self, qb_far: torch.Tensor, key: tuple, far: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass of placed grouped query rows over the first tokens and the edge they read capped."""
        index, seen = far
        n_local = self.settings.n_local
        if self.call.alibi is None:
            mask = self.layout.once((*key, "far", qb_far.shape[0], self.rep), self.seen_as, seen[None], n_local)
        else:
            mask = self.seen_as(seen[None], n_local)
        keys, values = self.k_placed[:, :, index], self.v[:, :, index]
        return attend(qb_far, keys, values, mask, self.call.scaling, self.flash, softcap=self.call.softcap)

    def _score(self, p: torch.Tensor, lse: torch.Tensor, parts: list, lo: int, hi: int) -> None:
        """Add the attention each recent window key received (its share of each query's whole
        softmax) to its mass, for the representatives of its block."""
        B, Hkv, rep, _, _ = self.q_grouped.shape
        n = lse.shape[-1] // rep
        total_lse = torch.stack([part[1] for part in parts]).logsumexp(dim=0)
        weight = torch.exp(lse - total_lse).view(B, Hkv, rep, 1, n)  # each row's share of its softmax
        received = (weight @ p.view(B, Hkv, rep, n, -1)).view(B, Hkv * rep, -1)
        if hi > self.S:  # first tokens never go into blocks: only recent ones are scored
            start = max(lo, self.S)
            self.mass[:, :, start - self.S : hi - self.S] += received[:, :, start - lo :]

    def form_block(self) -> None:
        """Cut the next block out of the recent tokens: its keys (placed), values and representatives."""
        memory, s = self.memory, self.settings
        lo = self.phys(s.n_global + memory.n_blocks * s.block_size)
        hi = lo + s.block_size
        keys = self.k_placed[:, :, lo:hi]
        best = self.mass[:, :, lo - self.S : hi - self.S].topk(s.repr_topk, dim=-1).indices  # (B, Hq, r)
        per_head = keys.repeat_interleave(self.rep, 1)  # (B, Hq, block, D)
        picked = per_head.gather(2, best[..., None].expand(-1, -1, -1, keys.shape[-1]))
        memory.add_block(torch.stack((keys, self.v[:, :, lo:hi])), wide(picked).mean(2).to(self.k.dtype))

    def _memory_parts(self, q_far: torch.Tensor, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The passes of a group (q_far (B, Hkv, rep, n, D), placed) over its queries' chosen blocks."""
        chosen, union = self._choose(q_far, m)
        n, top_blocks = q_far.shape[3], self.settings.top_blocks
        if n * len(union) > top_blocks * n + BLOCK_OVERHEAD * len(union):
            return [self._chosen_blocks_only(q_far, chosen, union)]
        return self._union_parts(q_far, chosen, union, m)

    def _choose(self, q_far: torch.Tensor, m: int) -> tuple[torch.Tensor, list[int]]:
        """(which of the m blocks each query reads (B, n, m): its top_blocks best by the capped
        logit against their representatives, summed over heads; the blocks any query reads)."""
        B, Hkv, rep, n, D = q_far.shape
        top_blocks = self.settings.top_blocks
        reps = wide(self.memory.reps[:, :, :m])  # (B, Hq, m, D)
        score = torch.einsum("bhnd,bhmd->bnm", wide(q_far.reshape(B, Hkv * rep, n, D)), reps)
        if m > top_blocks:
            chosen = torch.zeros(B, n, m, dtype=torch.bool, device=q_far.device)
            chosen.scatter_(-1, score.topk(top_blocks, dim=-1).indices, True)
        else:
            chosen = torch.ones(B, n, m, dtype=torch.bool, device=q_far.device)
        return chosen, chosen.flatten(0, 1).any(0).nonzero().flatten().tolist()

    def _union_parts(self, q_far: torch.Tensor, chosen: torch.Tensor, union: list[int], m: int) -> list:
        """A group's memory passes over the union of its queries' blocks, each query under a
        mask of its own choice, as many blocks at a time as the hot cache holds."""
        B, n, block_size, store = q_far.shape[0], q_far.shape[3], self.settings.block_size, self.memory.store
        scaling, softcap, n_local = self.call.scaling, self.call.softcap, self.settings.n_local
        qb, parts = rows(q_far), []
        for c in range(0, len(union), store.hot):
            blocks = union[c : c + store.hot]
            keys, values, block_in = store.load(blocks, self.k)  # every hot slot, read under a mask
            if n >= GATHER_FROM:  # enough queries to pay for copying out only this batch's blocks
                at = torch.tensor([store.slot_of[b] for b in blocks], device=q_far.device)[:, None] * block_size
                index = (at + torch.arange(block_size, device=q_far.device)).flatten()
                seen = chosen[:, :, blocks].repeat_interleave(block_size, dim=-1)
                mask = self.seen_as(seen, n_local)
                parts.append(attend(qb, keys[:, :, index], values[:, :, index], mask, scaling, False, softcap=softcap))
                continue
            now = torch.zeros(m + 1, dtype=torch.bool, device=q_far.device)  # index m: an empty slot
            now[blocks] = True
            slot = torch.where(block_in >= 0, block_in, m)
            seen = torch.cat((chosen, now[None, None, -1:].expand(B, n, 1)), -1)[:, :, slot] & now[slot]  # (B, n, hot)
            seen = seen.repeat_interleave(block_size, dim=-1)  # (B, n, hot * block)
            # Plain matmuls: the fused kernel is the slower one under a mask that hides half the keys.
            parts.append(attend(qb, keys, values, self.seen_as(seen, n_local), scaling, False, softcap=softcap))
        return parts

    def _chosen_blocks_only(
        self, q_far: torch.Tensor, chosen: torch.Tensor, union: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's memory pass, block by block: each block against only the queries that chose it
        (their top_blocks, not the whole union), the partial softmaxes merged per query by lse.
        -> (output, lse) as grouped rows, one part."""
        B, Hkv, rep, n, D = q_far.shape
        block_size, store = self.settings.block_size, self.memory.store
        choice = chosen.cumsum(-1) - 1  # which of its choices a block is for a query
        width = int(chosen.sum(-1).max())
        exact = wide(q_far[..., :0]).dtype
        outs = torch.zeros(B, Hkv, rep, n, width, D, dtype=exact, device=q_far.device)
        lses = torch.full((B, Hkv, rep, n, width), -torch.inf, dtype=exact, device=q_far.device)
        for c in range(0, len(union), store.hot):
            blocks = union[c : c + store.hot]
            keys, values, _ = store.load(blocks, self.k)
            for block in blocks:
                at = store.slot_of[block] * block_size
                for b in range(B):
                    who = chosen[b, :, block].nonzero().flatten()
                    if not len(who):
                        continue
                    o, lse = self._block_pass(
                        q_far[b : b + 1, :, :, who],
                        keys[b : b + 1, :, at : at + block_size],
                        values[b : b + 1, :, at : at + block_size],
                    )
                    j = choice[b, who, block]
                    outs[b, :, :, who, j] = o.view(Hkv, rep, len(who), D)
                    lses[b, :, :, who, j] = lse.view(Hkv, rep, len(who))
        lse = lses.logsumexp(-1)
        weight = torch.exp(lses - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        out = (weight[..., None] * outs).sum(-2)
        return rows(out), lse.reshape(B, Hkv, rep * n)

    def _block_pass(self, q_who: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's queries that chose a block (1, Hkv, rep, w, D) over its keys, read capped."""
        bias = None
        if self.call.alibi is not None:  # ALiBi: the capped distance's bias
            seen = torch.ones(1, q_who.shape[3], keys.shape[2], dtype=torch.bool, device=q_who.device)
            bias = self.seen_as(seen, self.settings.n_local)[:1]
        return attend(rows(q_who), keys, values, bias, self.call.scaling, False, softcap=self.call.softcap)


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
