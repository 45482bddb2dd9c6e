"""Re-rotating rotary-embedded vectors by a position delta.

The model applies RoPE before the cache and before our attention function, so every
query and key we see is already rotated to its own absolute position. To read a key
"as if it were n_local tokens away" we rotate the query and the key by position deltas.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, N, 2 * len(inv_freq)) that rotate forward by `delta` (B, N) positions.

    The angle is formed in float64 from the integer delta, so large positions do not lose
    precision; the rotation itself runs in float32.
    """
    angle = delta.to(torch.float64)[:, None, :, None] * inv_freq.to(delta.device, torch.float64)
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos().float(), angle.sin().float()


def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate `x` (B, H, N, D) by a `rotation(...)`.

    Only the first `2 * len(inv_freq)` channels rotate (partial rotary, as in Phi-3);
    the rest pass through. Uses the Llama "rotate_half" pairing (channel f with f + rot/2).
    """
    cos, sin = cos_sin
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    out = (x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
