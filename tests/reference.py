"""A dense, slow, obviously-correct attention driven by a strategy's rule, for the tests only.

It builds the full (query, key) matrix: the strategy's `rule` says, for every pair of real
positions, whether it is seen, the rotary distance its logit is scored at, and which pairs
a query head may pick its top-k from; the logit at that distance is computed from the
un-rotated vectors written as complex numbers (none in a NoPE layer), then soft-capped if
the model caps its logits. No blocks, no shortcuts, float64 throughout.
"""

from __future__ import annotations

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
    if call.softcap is not None:
        logits = call.softcap * torch.tanh(logits / call.softcap)

    keep = (valid & rule.seen)[:, None].expand(-1, Hq, -1, -1)
    if rule.top_k:
        candidates = (valid & rule.candidates & ~rule.seen)[:, None].expand(-1, Hq, -1, -1)
        scores = logits.masked_fill(~candidates, -torch.inf)
        n = min(rule.top_k, scores.shape[-1])
        chosen = torch.zeros_like(candidates).scatter(-1, scores.topk(n, dim=-1).indices, True)
        keep = keep | (chosen & candidates)
    logits = logits.masked_fill(~keep, -torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query with no key outputs zeros
    return (probs @ v).to(dtype)
