"""Attention over each query head's best `top_k` keys among many, scored in chunks."""

from __future__ import annotations

import torch

from lminf.kernels.sdpa import rows_mask, softcapped

KEY_CHUNK = 4096  # candidate keys scored at once


def top_k_attention(
    q,
    k,
    v,
    candidates,
    hi: int,
    top_k: int,
    rep: int,
    scaling: float,
    softcap: float | None = None,
    bias=None,
    all_or_none: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hkv, M, D) as grouped rows, k and v (B, Hkv, K, D); keys [0, hi) are scored.
    candidates(c, d) -> (B, M/rep, d - c) bool: which keys of chunk [c, d) each query may pick.
    all_or_none: a query with fewer than `top_k` candidates picks none.
    -> (output (B, Hkv, M, D) float32, log-sum-exp (B, Hkv, M)) over the picked keys."""
    B, Hkv, M, D = q.shape
    q = q.to(k.dtype)  # a 16-bit cache's keys: q rounded to theirs
    best_s = best_idx = None
    count = 0
    for c in range(0, hi, KEY_CHUNK):
        d = min(c + KEY_CHUNK, hi)
        s = softcapped((q @ k[:, :, c:d].transpose(-1, -2)).float() * scaling, softcap)
        if bias is not None:  # bias(c, d) -> (B, Hkv, M, d - c) added to the logits (ALiBi)
            s = s + bias(c, d)
        allowed = candidates(c, d)
        count = count + allowed.sum(-1)
        s = s.masked_fill(~rows_mask(allowed, rep), -torch.inf)
        idx = torch.arange(c, d, device=s.device).expand_as(s)
        if best_s is not None:
            s, idx = torch.cat((best_s, s), -1), torch.cat((best_idx, idx), -1)
        best_s, pick = s.topk(min(top_k, s.shape[-1]), dim=-1)
        best_idx = idx.gather(-1, pick)
    lse = torch.logsumexp(best_s, dim=-1)
    if all_or_none:
        too_few = rows_mask((count < top_k)[..., None], rep)[:, 0, :, 0]  # (B, M)
        lse = lse.masked_fill(too_few[:, None, :], -torch.inf)
    p = torch.exp(best_s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # (B, Hkv, M, k)
    v_picked = v.gather(2, best_idx.reshape(B, Hkv, -1, 1).expand(-1, -1, -1, D)).view(B, Hkv, M, -1, D)
    return torch.einsum("bhmk,bhmkd->bhmd", p, v_picked.float()), lse
