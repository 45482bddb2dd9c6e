"""flash_attn.modules.mha.FlashSelfAttention on the CPU shim (eval only: no dropout, no unpadded batches)."""

from __future__ import annotations

import torch
from torch import nn

from flash_attn import flash_attn_qkvpacked_func


class FlashSelfAttention(nn.Module):
    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, window_size=(-1, -1),
                 deterministic=False):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = window_size

    def forward(self, qkv: torch.Tensor, causal=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """qkv (b, s, 3, h, d) -> (b, s, h, d)."""
        if cu_seqlens is not None:
            raise NotImplementedError("the shim has no unpadded (cu_seqlens) batches")
        causal = self.causal if causal is None else causal
        return flash_attn_qkvpacked_func(qkv, softmax_scale=self.softmax_scale, causal=causal,
                                         window_size=self.window_size)
