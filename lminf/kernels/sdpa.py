"""Softmax attention passes that return (output, log-sum-exp), and their exact merge.

A strategy's attention is a few such passes over different key sets (a window, a few far
keys, selected middle keys); merging their outputs through their log-sum-exps gives one
softmax over the union. Two backends compute a pass, chosen by one switch (`kernel`):
"torch" (plain matmuls, everywhere) and "flash_cpu" (torch's fused CPU kernel); "auto"
takes the fused one on CPU where torch has it. "compiled" is "auto" here, and a decoding
step's one query through torch.compile (lminf.kernels.one_query). A GPU backend goes here.
"""

from __future__ import annotations

import torch

# torch's fused CPU attention that also returns the log-sum-exp (an aten op, not public API).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KERNELS = ("auto", "flash_cpu", "torch", "compiled")


def use_flash(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` means the fused CPU kernel on `device`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    auto = kernel in ("auto", "compiled")
    return kernel == "flash_cpu" or (auto and device.type == "cpu" and _FLASH_CPU is not None)


def attend(
    q, k, v, mask, scaling: float, flash: bool, causal: bool = False, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, H, M, D) over k, v (B, H, L, D) under a boolean mask
    (B, 1, M, L), an additive float bias (B, H or 1, M, L) that is -inf where masked (ALiBi),
    or none -> (output (B, H, M, D) float32, log-sum-exp (B, H, M) float32; float64 inputs stay float64).
    causal: query m sees keys 0..m (M == L). softcap: logits become softcap * tanh(logits /
    softcap) (Gemma 2); the fused kernel cannot, so the plain path runs. Keys stored in a narrower
    dtype than q (a 16-bit cache): q is rounded to theirs, the sums stay float32."""
    q = q.to(k.dtype)
    if k.shape[-2] == 0:  # no key at all (the fused kernel would divide by zero)
        empty = torch.zeros(q.shape[:-1], dtype=wide(q[..., :0]).dtype, device=q.device)
        return empty[..., None].expand(*q.shape[:-1], v.shape[-1]).clone(), empty - torch.inf
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()[None, None]
    additive = mask is not None and mask.dtype != torch.bool
    if flash and softcap is None:
        bias = mask.to(q.dtype) if additive else None
        if mask is not None and not causal and not additive:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -torch.inf)
        o, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=scaling)
        if bias is not None:  # the kernel reports lse 0, not -inf, for a row with no visible key
            lse = torch.where(torch.isfinite(bias).any(-1), lse, -torch.inf)
        return wide(o), wide(lse)
    s = capped(wide(q @ k.transpose(-1, -2)) * scaling, softcap)
    if additive:
        s = s + mask
    elif mask is not None:
        s = s.masked_fill_(~mask, -torch.inf)
    p, lse = softmax_lse(s)
    return wide(p.to(v.dtype) @ v), lse


def softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax over the last dim, log-sum-exp) of logits `s`. A row with no finite logit:
    zeros and -inf. torch's fused softmax reads `s` once and writes p once; the lse follows
    from the row maxima, as p's largest entry is exp(max - lse) (two reads, against the eight
    passes over s of max, subtract, exp, sum and divide: 1.7x faster InfLLM window passes on CPU)."""
    top = s.amax(-1)
    p = torch.softmax(s, -1)
    lse = top - p.amax(-1).log()
    if not bool(torch.isfinite(top).all()):  # empty rows: softmax gives NaN, the max -inf
        p = p.nan_to_num_(0.0)
        lse = torch.where(torch.isfinite(top), lse, -torch.inf)
    return p, lse


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 for softmax arithmetic; float64 stays float64 (the tests' exact runs)."""
    return x if x.dtype == torch.float64 else x.float()


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def attend_causal_grouped(
    q, k, v, scaling: float, flash: bool, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's own keys, causally: q (B, Hkv, rep, n, D), k and v (B, Hkv, n, D)
    -> (output, lse) as rows (B, Hkv, rep*n, ...)."""
    B, Hkv, rep, n, D = q.shape
    # A causal mask is per head, so the grouped heads cannot be folded into rows here.
    o, lse = attend(
        q.reshape(B, Hkv * rep, n, D),
        k.repeat_interleave(rep, 1),
        v.repeat_interleave(rep, 1),
        None,
        scaling,
        flash,
        True,
        softcap,
    )
    return o.reshape(B, Hkv, rep * n, D), lse.reshape(B, Hkv, rep * n)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
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


def rows(x: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, rep, n, X) -> (B, Hkv, rep*n, X): grouped query heads as extra rows"""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def rows_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, n, L) -> (B, 1, rep*n, L), the same mask for every grouped head"""
    B, n, L = mask.shape
    return mask[:, None, None].expand(B, 1, rep, n, L).reshape(B, 1, rep * n, L)


def alibi_bias(distance: torch.Tensor, seen: torch.Tensor, slopes: torch.Tensor, rep: int) -> torch.Tensor:
    """ALiBi's additive bias as grouped rows: -slope * distance where seen, -inf elsewhere.
    distance, seen (B, n, L); slopes (Hq,) -> (B, Hkv, rep*n, L)."""
    B, n, L = distance.shape
    per_head = -slopes.view(-1, rep, 1, 1).float() * distance[:, None, None].float()  # (B, Hkv, rep, n, L)
    bias = per_head.masked_fill(~seen[:, None, None], -torch.inf)
    return bias.reshape(B, -1, rep * n, L)
