"""A dense, slow, obviously-correct Lambda attention, used only by the tests.

It builds the full (query, key) matrix: for every pair it decides local / global /
middle from the real positions, picks the effective distance (true distance if local,
n_local otherwise, or the StreamingLLM re-indexed distance), and computes the rotary logit at that distance from the un-rotated
vectors written as complex numbers. No blocks, no shortcuts, float64 throughout.
"""

from __future__ import annotations

import torch


def reference_attention(q, k, v, layout, *, n_global, n_local, top_k, inv_freq, scaling, global_distance="capped"):
    dtype = q.dtype
    Hq = q.shape[1]
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    q = q.double()
    F = inv_freq.numel()
    w = inv_freq.double()

    def unrotated(x, pos):  # channel f pairs with f + F (rotate_half): z = x_f + i x_{f+F}
        z = torch.complex(x[..., :F], x[..., F : 2 * F])
        return z * torch.exp(-1j * pos.double()[:, None, :, None] * w)

    zq, zk = unrotated(q, layout.q_pos), unrotated(k, layout.k_pos)  # (B, H, N, F)
    d = layout.q_pos[:, :, None] - layout.k_pos[:, None, :]  # (B, Q, K) true distances
    valid = layout.k_valid[:, None, :] & (d >= 0)
    local = valid & (d < n_local)
    glob = valid & ~local & (layout.k_pos[:, None, :] < n_global)
    middle = valid & ~local & ~glob
    if global_distance == "capped":
        far = torch.full_like(d, n_local)
    else:  # StreamingLLM: positions inside a [n_global | n_local] cache, re-indexed once it is full
        far = layout.q_pos.clamp(max=n_global + n_local - 1)[:, :, None] - layout.k_pos[:, None, :]
    d_eff = torch.where(local, d, far).double()

    phase = torch.exp(1j * d_eff[:, None, :, :, None] * w)  # (B, 1, Q, K, F)
    logits = (zq[:, :, :, None, :] * zk.conj()[:, :, None, :, :] * phase).real.sum(-1)
    logits = logits + q[..., 2 * F :] @ k[..., 2 * F :].transpose(-1, -2)  # channels RoPE leaves alone
    logits = logits * scaling

    keep = (local | glob)[:, None].expand(-1, Hq, -1, -1)
    if top_k:
        mid = middle[:, None].expand(-1, Hq, -1, -1)
        scores = logits.masked_fill(~mid, -torch.inf)
        n = min(top_k, scores.shape[-1])
        chosen = torch.zeros_like(mid).scatter(-1, scores.topk(n, dim=-1).indices, True)
        keep = keep | (chosen & mid)
    logits = logits.masked_fill(~keep, -torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query with no key outputs zeros
    return (probs @ v).to(dtype)
