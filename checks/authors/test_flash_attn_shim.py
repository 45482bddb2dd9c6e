"""The flash-attn shim against a float64 reference written query by query (run by run.sh, not by CI)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "shim"))
from flash_attn import _attention, flash_attn_func, flash_attn_qkvpacked_func, flash_attn_with_kvcache  # noqa: E402
from flash_attn.modules.mha import FlashSelfAttention  # noqa: E402


def reference(q, k, v, scale, causal, lengths=None):
    """Each query: softmax over the keys it may see (the first `length`; causal: up to i + length - sq)."""
    batch, q_len, heads, _ = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        length = k.shape[1] if lengths is None else int(lengths[b])
        for h in range(heads):
            for i in range(q_len):
                last = length if not causal else min(length, i + length - q_len + 1)
                if last <= 0:
                    continue
                keys, values = k[b, :last, h // group].double(), v[b, :last, h // group].double()
                weights = torch.softmax(keys @ q[b, i, h].double() * scale, dim=0)
                out[b, i, h] = weights @ values
    return out


@pytest.mark.parametrize("q_len,k_len,causal", [(5, 5, True), (3, 7, True), (7, 3, True), (4, 6, False)])
def test_func_matches_reference(q_len, k_len, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, q_len, 4, 8), torch.randn(2, k_len, 2, 8), torch.randn(2, k_len, 2, 8)
    out = flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, causal), atol=1e-5, rtol=1e-5)


def test_qkvpacked_and_module_match_reference():
    torch.manual_seed(1)
    qkv = torch.randn(2, 6, 3, 3, 8)
    expected = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 8**-0.5, True)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True).double(), expected, atol=1e-5, rtol=1e-5)
    full = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 8**-0.5, False)
    torch.testing.assert_close(FlashSelfAttention(causal=False)(qkv).double(), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_reads_only_cache_seqlens(causal):
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 3, 8), torch.randn(3, 9, 3, 8), torch.randn(3, 9, 3, 8)
    lengths = torch.tensor([9, 4, 6], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, softmax_scale=0.2, causal=causal)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.2, causal, lengths), atol=1e-5, rtol=1e-5)


def test_query_blocks_change_nothing():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    lengths = torch.tensor([9, 8])
    out = _attention(q, k, v, 0.3, True, lengths, block=3)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, True, lengths), atol=1e-5, rtol=1e-5)
