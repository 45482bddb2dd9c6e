"""LambdaLayer against transformers' DynamicLayer, the growing cache that keeps everything."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

from lminf.caches.lambda_cache import LambdaLayer


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=25),
    n_global=st.integers(0, 3),
    n_local=st.sampled_from([None, 1, 4, 9]),
    select_at=st.integers(0, 25),
    seed=st.integers(0, 2**31 - 1),
)
def test_stored_tokens_are_the_first_n_global_and_the_last_n_local(chunks, n_global, n_local, select_at, seed):
    gen = torch.Generator().manual_seed(seed)
    layer, everything = LambdaLayer(n_global, n_local), DynamicLayer()
    for step, n in enumerate(chunks):
        if step == select_at and step:  # as beam search reorders the batch between steps
            layer.batch_select_indices(torch.tensor([1, 0]))
            everything.batch_select_indices(torch.tensor([1, 0]))
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        got_k, got_v = layer.update(k, v)
        all_k, all_v = everything.update(k, v)
        total = all_k.shape[-2]
        assert layer.get_seq_length() == total
        # The queries' own keys are always returned last, in order.
        torch.testing.assert_close(got_k[..., -n:, :], k, rtol=0, atol=0)
        torch.testing.assert_close(got_v[..., -n:, :], v, rtol=0, atol=0)
        # What is kept: everything while it fits, else the first n_global and the last n_local (ring order undone).
        kept = torch.arange(total)
        if n_local is not None and total > n_global + n_local:
            kept = torch.cat((torch.arange(n_global), torch.arange(total - n_local, total)))
        torch.testing.assert_close(torch.cat(layer._chronological(layer.keys), -2), all_k[..., kept, :], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat(layer._chronological(layer.values), -2), all_v[..., kept, :], rtol=0, atol=0)
        if n_local is not None:
            assert layer.nbytes() <= 2 * 2 * 3 * (n_global + n_local) * 4 * 4  # K and V, batch 2, 3 heads, dim 4, fp32


def test_decoding_below_the_bound_writes_in_place():
    layer = LambdaLayer(n_global=4, n_local=None)
    storages = set()
    for _ in range(2000):
        keys, _ = layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        storages.add(keys.data_ptr())
    # Room grows geometrically: a handful of copies, not one per token as with torch.cat.
    assert len(storages) <= 12
    assert layer.nbytes() <= 2 * (2000 * 1.25 + 256) * 2 * 8 * 4
