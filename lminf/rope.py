"""Re-rotating rotary-embedded vectors by a position delta.

The model applies RoPE before the cache and before our attention function, so every
query and key we see is already rotated to its own absolute position. To read a key
"as if it were n_local tokens away" we rotate the query and the key by position deltas.

Two pairings of channels exist: Llama's "rotate_half" (channel f turns with f + rot/2, the
common one) and GPT-J's interleaved pairs (channel 2f with 2f + 1).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotation(
    delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, N, 2 * len(inv_freq)) that rotate forward by `delta` (B, N) positions,
    laid out for the pairing (`interleaved`: GPT-J's).

    The angle is formed in float64 from the integer delta, so large positions do not lose
    precision; the rotation itself runs in `dtype` (float32; float64 for exact runs).
    """
    angle = delta.to(torch.float64)[:, None, :, None] * inv_freq.to(delta.device, torch.float64)
    angle = angle.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angle, angle), dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], interleaved: bool = False) -> torch.Tensor:
    """Rotate `x` (B, H, N, D) by a `rotation(...)` made for the same pairing.

    Only the first `2 * len(inv_freq)` channels rotate (partial rotary, as in Phi-3 or GPT-J);
    the rest pass through.
    """
    cos, sin = cos_sin
    rot = cos.shape[-1]
    x_rot = x[..., :rot].to(torch.promote_types(x.dtype, cos.dtype))
    turned = rotate_every_two(x_rot) if interleaved else rotate_half(x_rot)
    out = (x_rot * cos + turned * sin).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
