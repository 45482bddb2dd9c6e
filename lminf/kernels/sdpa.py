"""Softmax attention passes that return (output, log-sum-exp), and their exact merge.

A strategy's attention is a few such passes over different key sets (a window, a few far
keys, selected middle keys); merging their outputs through their log-sum-exps gives one
softmax over the union. Two backends compute a pass, chosen by one switch (`kernel`):
"torch" (plain matmuls, everywhere) and "flash_cpu" (torch's fused CPU kernel); "auto"
takes the fused one on CPU where torch has it. A GPU backend goes here.
"""

from __future__ import annotations

import math

import torch

# torch's fused CPU attention that also returns the log-sum-exp (an aten op, not public API).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KERNELS = ("auto", "flash_cpu", "torch")
# kernels that once were, and what replaced them
REPLACED = {
    "compiled": "kernel 'compiled' (torch.compile) is gone: 'auto' runs lminf's C++ kernels for a decoding step "
    "on a CPU (every layer and its attention in one call), faster, with the same C++ compiler "
    "(docs/measurements/compiled-vs-auto.json); use 'auto'",
}


def check_kernel(kernel: str, what: str = "kernel") -> None:
    """A ValueError unless `kernel` is one of KERNELS; for a removed one it says what replaced it."""
    if kernel in REPLACED:
        raise ValueError(f"{REPLACED[kernel]}.")
    if kernel not in KERNELS:
        raise ValueError(f"{what} must be one of {KERNELS}, got {kernel!r}.")


def use_flash(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` means the fused CPU kernel on `device`."""
    check_kernel(kernel)
    return kernel == "flash_cpu" or (kernel == "auto" and device.type == "cpu" and _FLASH_CPU is not None)


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
    s = softcapped(wide(q @ k.transpose(-1, -2)) * scaling, softcap)
    if additive:
        s = s + mask
    elif mask is not None:
        s = s.masked_fill_(~mask, -torch.inf)
    p, lse = softmax_lse(s)
    return wide(p.to(v.dtype) @ v), lse


# A one-query pass over at least this many keys runs in parts on the fused kernel (`one_query_pass`):
# below it, merging the parts costs more than the even work saves (docs/history.md, one-query-in-parts-ab).
SPLIT_FROM = 4096


def one_query_pass(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, flash: bool) -> torch.Tensor:
    """One query's heads grouped by their key head, rows (1, Hkv, rep, D), over keys and values
    (1, Hkv, S, D), S > 0 -> (1, Hkv, rep, D) float32 (float64 stays float64).

    Why in parts: the fused kernel shares whole heads out between its threads, so the default
    model's 3 key heads on 2 threads left one thread idle a third of the time. Cut into parts
    (each part a batch row of its own, so Hkv * parts is a multiple of the threads) the work is
    even. The parts merge through their log-sum-exps."""
    hkv, n_keys = keys.shape[1], keys.shape[2]
    threads = torch.get_num_threads()
    parts = threads // math.gcd(hkv, threads)
    if not flash or parts == 1 or n_keys < max(SPLIT_FROM, parts):
        return attend(rows, keys, values, None, scaling, flash)[0]
    size = n_keys // parts
    cut = size * parts

    def split(x: torch.Tensor) -> torch.Tensor:  # (1, Hkv, S, D) -> (parts, Hkv, size, D), a view
        return x[0, :, :cut].unflatten(1, (parts, size)).transpose(0, 1)

    o, lse = attend(rows.expand(parts, -1, -1, -1), split(keys), split(values), None, scaling, flash)
    if cut < n_keys:  # the last keys, fewer than parts
        rest_o, rest_lse = attend(rows, keys[:, :, cut:], values[:, :, cut:], None, scaling, flash)
        o, lse = torch.cat((o, rest_o)), torch.cat((lse, rest_lse))
    share = torch.softmax(lse, 0)  # every part saw keys: its lse is finite
    return (o * share[..., None]).sum(0, keepdim=True)


def softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax over the last dim, log-sum-exp) of logits `s`. A row with no finite logit:
    zeros and -inf. torch's fused softmax reads `s` once and writes p once; the lse follows
    from the row maxima, as p's largest entry is exp(max - lse) (two reads, against the eight
    passes over s of max, subtract, exp, sum and divide)."""
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


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits soft-capped as Gemma 2 does: softcap * tanh(logits / softcap); as they are for None."""
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
