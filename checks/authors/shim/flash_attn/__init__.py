"""A CPU stand-in for the flash-attn 2.3 calls the LongHeads code makes, for the authors'-code check only.

Plain float32 torch: softmax(q k^T * scale) v. Shapes follow flash-attn: (batch, seqlen, heads, head_dim).
`causal` is flash-attn's (>= 2.1): aligned to the bottom-right, so when q is shorter than k the last query
sees every key; a query that sees no key gets zeros, as flash-attn returns.
"""

from __future__ import annotations

import torch

__version__ = "2.3.6+cpu-shim"


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, causal: bool,
               key_lengths: torch.Tensor | None = None, block: int = 512) -> torch.Tensor:
    """q (b, sq, h, d), k/v (b, sk, hk, d) with h a multiple of hk; key_lengths (b,): keys past it are ignored.
    Queries go `block` at a time so a long prompt's scores fit in memory (rows are independent: same result)."""
    q_len, heads, head_dim = q.shape[1:]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k32 = k.float().transpose(1, 2).repeat_interleave(heads // k.shape[2], dim=1)  # (b, h, sk, d)
    v32 = v.float().transpose(1, 2).repeat_interleave(heads // v.shape[2], dim=1)
    k_len = k.shape[1]
    lengths = torch.full((q.shape[0],), k_len) if key_lengths is None else key_lengths.long().cpu()
    key_index = torch.arange(k_len)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, q_len, block):
        q32 = q[:, start : start + block].float().transpose(1, 2)  # (b, h, rows, d)
        scores = torch.matmul(q32, k32.transpose(-1, -2)) * scale  # (b, h, rows, sk)
        visible = key_index[None, None, :] < lengths[:, None, None]  # (b, 1, sk)
        if causal:  # query i sees key j <= i + (length - sq)
            query_index = torch.arange(start, min(start + block, q_len))
            last_visible = query_index[None, :, None] + (lengths[:, None, None] - q_len)
            visible = visible & (key_index[None, None, :] <= last_visible)  # (b, rows, sk)
        weights = torch.softmax(scores.masked_fill(~visible.unsqueeze(1).to(q.device), float("-inf")), dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a row with no visible key: zeros
        out[:, start : start + block] = torch.matmul(weights, v32).transpose(1, 2).to(q.dtype)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_attn_probs=False):
    _check(dropout_p, window_size, return_attn_probs)
    return _attention(q, k, v, softmax_scale, causal)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              return_attn_probs=False):
    """qkv (b, s, 3, h, d)."""
    _check(dropout_p, window_size, return_attn_probs)
    return _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale, causal)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), rotary_interleaved=True, alibi_slopes=None):
    """Attention of q over the first cache_seqlens[i] keys of the cache (all of them when None)."""
    if k is not None or v is not None or rotary_cos is not None or cache_batch_idx is not None or alibi_slopes is not None:
        raise NotImplementedError("the shim covers the calls the LongHeads code makes: no append, rotary, alibi")
    _check(0.0, window_size, False)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens)
    return _attention(q, k_cache, v_cache, softmax_scale, causal, cache_seqlens)


def _check(dropout_p: float, window_size: tuple[int, int], return_attn_probs: bool) -> None:
    if dropout_p != 0.0 or tuple(window_size) != (-1, -1) or return_attn_probs:
        raise NotImplementedError("the shim has no dropout, local window or returned probabilities")
