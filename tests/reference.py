"""A dense, slow, obviously-correct attention driven by a strategy's rule, for the tests only.

It builds the full (query, key) matrix: the strategy's `rule` says, for every pair of real
positions, whether it is seen, the rotary distance its logit is scored at, and which pairs
a query head may pick its top-k from; the logit at that distance is computed from the
un-rotated vectors written as complex numbers (none in a NoPE layer), then soft-capped if
the model caps its logits. No blocks, no shortcuts, float64 throughout.
"""

from __future__ import annotations

import functools

import torch


def reference_attention(strategy, q, k, v, layout, call):
    dtype, Hq = q.dtype, q.shape[1]
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    q = q.double()
    w = torch.zeros(0, dtype=torch.float64) if call.inv_freq is None else call.inv_freq.double()  # NoPE: no rotated channel
    F = w.numel()

    def unrotated(x, pos):  # channel f pairs with f + F (rotate_half): z = x_f + i x_{f+F}; GPT-J: 2f with 2f + 1
        z = (
            torch.complex(x[..., 0 : 2 * F : 2], x[..., 1 : 2 * F : 2])
            if call.interleaved
            else torch.complex(x[..., :F], x[..., F : 2 * F])
        )
        return z * torch.exp(-1j * pos.double()[:, None, :, None] * w)

    zq, zk = unrotated(q, layout.q_pos), unrotated(k, layout.k_pos)  # (B, H, N, F)
    i, j = layout.q_pos[:, :, None], layout.k_pos[:, None, :]
    valid = layout.k_valid[:, None, :] & (i - j >= 0)  # (B, Q, K): real keys, causal
    rule = strategy.rule(i, j, call.layer)

    phase = torch.exp(1j * rule.distance.double()[:, None, :, :, None] * w)  # (B, 1, Q, K, F)
    logits = (zq[:, :, :, None, :] * zk.conj()[:, :, None, :, :] * phase).real.sum(-1)
    logits = logits + q[..., 2 * F :] @ k[..., 2 * F :].transpose(-1, -2)  # channels RoPE leaves alone
    logits = logits * call.scaling
    if call.alibi is not None:  # ALiBi: -slope x the distance the rule scores the pair at
        logits = logits - call.alibi.double()[None, :, None, None] * rule.distance.double()[:, None]

    if rule.chunk_candidates is not None:
        return _with_chosen_chunks(rule, q, zq, zk, k, v, layout, call).to(dtype)
    if rule.block is not None:
        return _with_block_memory(rule, logits, capped_logits(logits, call), valid, v, layout.q_pos).to(dtype)
    logits = capped_logits(logits, call)

    keep = (valid & rule.seen)[:, None].expand(-1, Hq, -1, -1)
    if rule.top_k:
        candidates = (valid & rule.candidates & ~rule.seen)[:, None].expand(-1, Hq, -1, -1)
        scores = logits.masked_fill(~candidates, -torch.inf)
        n = min(rule.top_k, scores.shape[-1])
        chosen = torch.zeros_like(candidates).scatter(-1, scores.topk(n, dim=-1).indices, True)
        if rule.top_k_all_or_none:  # fewer candidates than top_k: no pick
            chosen = chosen & (candidates.sum(-1, keepdim=True) >= rule.top_k)
        keep = keep | (chosen & candidates)
    logits = logits.masked_fill(~keep, -torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query with no key outputs zeros
    return (probs @ v).to(dtype)


def capped_logits(logits, call):
    return logits if call.softcap is None else call.softcap * torch.tanh(logits / call.softcap)


def _with_block_memory(rule, logits, capped, valid, v, q_pos):
    """A block memory, query by query in order of position (each query's choice needs the
    attention earlier queries gave): a block's representative score against a query is the
    mean, over heads and over its `repr_topk` most attended keys, of the query's logits with
    those keys at the rule's distance (before soft-capping), which is the query's logit with
    their mean vector; the query sees its `top_blocks` best blocks, all while there are no more."""
    B, Hq, Q, K = logits.shape
    out = torch.zeros(B, Hq, Q, v.shape[-1], dtype=torch.float64)
    received = torch.zeros(B, Hq, K, dtype=torch.float64)  # attention each key got from its scored pairs
    for b in range(B):
        for t in q_pos[b].argsort().tolist():  # queries in order of position
            block = rule.block[b, t]
            keep = (valid[b, t] & rule.seen[b, t]).clone()
            n_blocks = int(block.max()) + 1
            if n_blocks > 0:
                scores = []
                for c in range(n_blocks):
                    keys = (block == c).nonzero().flatten()
                    best = received[b][:, keys].topk(rule.repr_topk, dim=-1).indices  # (Hq, r)
                    scores.append(logits[b, :, t][torch.arange(Hq)[:, None], keys[best]].mean())
                chosen = torch.stack(scores).topk(min(rule.top_blocks, n_blocks)).indices
                keep |= torch.isin(block, chosen) & valid[b, t]
            probs = torch.softmax(capped[b, :, t].masked_fill(~keep, -torch.inf), dim=-1).nan_to_num(0.0)
            out[b, :, t] = torch.einsum("hk,hkd->hd", probs, v[b])
            received[b] += probs * (rule.scored[b, t] & valid[b, t])
    return out


def _with_chosen_chunks(rule, q, zq, zk, k, v, layout, call):
    """Chunks chosen per query head (LongHeads), query by query: a chunk's summary key is built
    from its queries and keys as the Rule says, each head adds its best chunks, and every seen
    key's distance is the count of seen keys from it up to the query. A chunk's queries may have
    come in earlier calls: they are kept on the cache layer the call passes (`call.memory`)."""
    B, Hq, Q, K = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    F, w = zq.shape[-1], rule.chunk_tokens
    w_freq = torch.zeros(0, dtype=torch.float64) if call.inv_freq is None else call.inv_freq.double()
    past = getattr(call.memory, "reference_queries", None)  # (z, rest) of positions [0, p0)
    z_all, rest_all = zq, q[..., 2 * F :]
    if past is not None:
        z_all, rest_all = torch.cat((past[0], zq), 2), torch.cat((past[1], rest_all), 2)
    if call.memory is not None:
        call.memory.reference_queries = (z_all, rest_all)
    p0 = int(layout.q_pos[0, 0])
    assert z_all.shape[2] == p0 + Q, "the reference needs every query since position 0"

    def real(z, rest):  # complex channels and the rest -> the model's channel layout
        if call.interleaved:
            return torch.cat((torch.stack((z.real, z.imag), -1).flatten(-2), rest), -1)
        return torch.cat((z.real, z.imag, rest), -1)

    def logit(zq_, rq, zk_, rk, distance):  # the rotary logit at a distance, before scaling
        return (zq_ * zk_.conj() * torch.exp(1j * distance.double()[..., None] * w_freq)).real.sum(-1) + (rq * rk).sum(-1)

    @functools.cache
    def summary(b, h, x):  # chunk x's summary key for query head h, a real vector in the model's layout
        span = slice(x * w, (x + 1) * w)
        local = torch.arange(w)
        zqc, rqc = z_all[b, h, span], rest_all[b, h, span]
        zkc, rkc, vc = zk[b, h, span], k[b, h, span, 2 * F :], v[b, h, span]
        inside = logit(zqc[:, None], rqc[:, None], zkc[None], rkc[None], local[:, None] - local[None])
        s = (torch.softmax(capped_logits(inside * call.scaling, call), -1) @ vc).mean(0)
        k_local = real(zkc * torch.exp(1j * local.double()[:, None] * w_freq), rkc)
        return torch.softmax(k_local @ s * k.shape[-1] ** -0.5, 0) @ k_local

    out = torch.zeros(B, Hq, Q, v.shape[-1], dtype=torch.float64)
    valid_all = layout.k_valid[:, None, :] & (layout.q_pos[:, :, None] >= layout.k_pos[:, None, :])
    for b in range(B):
        for t in range(Q):
            i = int(layout.q_pos[b, t])
            candidates = rule.chunk_candidates[b, t] & valid_all[b, t]
            chunks = sorted({int(x) for x in layout.k_pos[b][candidates].div(w, rounding_mode="floor")})
            for h in range(Hq):
                seen = (rule.seen[b, t] & valid_all[b, t]).clone()
                if chunks:
                    q_unrotated = real(z_all[b, h, i], rest_all[b, h, i])
                    scores = torch.stack([q_unrotated @ summary(b, h, x) for x in chunks])
                    best = [chunks[c] for c in scores.topk(min(rule.top_chunks, len(chunks))).indices.tolist()]
                    seen |= torch.isin(layout.k_pos[b].div(w, rounding_mode="floor"), torch.tensor(best)) & candidates
                order = layout.k_pos[b].argsort()
                before = torch.zeros(K, dtype=torch.long)  # seen keys at positions >= j and < i
                before[order] = (seen[order] & (layout.k_pos[b][order] < i)).long().flip(0).cumsum(0).flip(0)
                logits = logit(zq[b, h, t], q[b, h, t, 2 * F :], zk[b, h], k[b, h, :, 2 * F :], before) * call.scaling
                probs = torch.softmax(capped_logits(logits, call).masked_fill(~seen, -torch.inf), -1).nan_to_num(0.0)
                out[b, h, t] = probs @ v[b, h]
    return out


def dense_attention(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(rows . keys * scale) . values in float64; rows (..., Hkv, rep, D), keys and values (..., Hkv, S, D)."""
    s = rows.double() @ keys.double().transpose(-1, -2) * scale
    return torch.softmax(s, -1) @ values.double()
