"""Every strategy's fast path against the dense reference, on random shapes and layouts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lminf.kernels import sdpa
from lminf.kernels.sdpa import softmax_lse
from lminf.layout import Layout
from lminf.strategies import AttentionCall, LMInfinite
from lminf.strategies.lm_infinite_original import LMInfiniteOriginal
from tests.reference import reference_attention
from tests.strategy_cases import random_case


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_fast_path_matches_reference(data):
    strategy, q, k, v, layout, call, real_queries = random_case(data)
    got = strategy.attention(q, k, v, layout, call)
    want = reference_attention(strategy, q, k, v, layout, call)
    # Compare real (non-padding) queries; fp32 vs a float64 reference.
    mask = real_queries[:, None, :, None].expand_as(got)
    tolerance = 1e-10 if q.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[mask], want[mask], rtol=tolerance, atol=tolerance)


def test_query_with_no_visible_key_gives_zeros():
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    pos = torch.arange(3)[None]
    layout = Layout(q_pos=pos, k_pos=pos, k_valid=torch.zeros(1, 3, dtype=torch.bool))
    out = LMInfinite(n_global=1, n_local=2).attention(q, k, v, layout, AttentionCall(0, torch.ones(4), 1.0))
    assert torch.equal(out, torch.zeros_like(out))


def test_the_original_top_k_picks_nothing_with_fewer_middle_keys_than_top_k():
    """lminf-original's last query picks none while it has fewer middle keys than top_k
    (length 12: one middle key, top_k 2), its top_k once it has them (13, 20): the reference."""
    strategy = LMInfiniteOriginal(n_global=3, n_local=8, top_k=2, top_k_from_layer=0, top_k_insert_at=5)
    call = AttentionCall(0, 1.0 / 10.0 ** (torch.arange(4) / 4), 8**-0.5)
    for n in (12, 13, 20):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, h, n, 8, generator=gen, dtype=torch.float64) for h in (2, 1, 1))
        pos = torch.arange(n)[None]
        layout = Layout(pos, pos, torch.ones(1, n, dtype=torch.bool))
        want = reference_attention(strategy, q, k, v, layout, call)
        torch.testing.assert_close(strategy.attention(q, k, v, layout, call), want, rtol=1e-6, atol=1e-6)  # top-k in float32


def test_softmax_lse_equals_torch_and_empties_rows_without_keys():
    s = torch.randn(2, 3, 5, 40, dtype=torch.float64) * 4
    s[0, 1, 2] = -torch.inf  # a row that sees no key
    s[1, 0, :, :7] = -torch.inf  # rows that see some
    p, lse = softmax_lse(s.clone())
    assert torch.equal(p[0, 1, 2], torch.zeros(40, dtype=torch.float64)) and lse[0, 1, 2] == -torch.inf
    keep = torch.isfinite(s).any(-1)
    torch.testing.assert_close(lse[keep], torch.logsumexp(s, -1)[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p[keep], torch.softmax(s, -1)[keep], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n_kv=st.sampled_from([1, 2, 3, 4]),
    rep=st.sampled_from([1, 3]),
    n_keys=st.integers(1, 40),
    offset=st.integers(0, 5),
    threads=st.sampled_from([1, 2, 3, 4]),
    kv_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_one_query_pass_in_parts_equals_the_dense_formula(n_kv, rep, n_keys, offset, threads, kv_dtype):
    # The fast step's pass (lminf.decoding): keys cut into parts so every thread has equal work,
    # the last keys left over, the stored keys a slice of a longer cache (a view, not a copy).
    g = torch.Generator().manual_seed(n_keys + 7 * offset)
    stored = torch.randn(1, n_kv, n_keys + offset + 3, 8, generator=g).to(kv_dtype)
    keys, values = stored[:, :, offset : offset + n_keys], stored.flip(-1)[:, :, offset : offset + n_keys]
    rows = torch.randn(1, n_kv, rep, 8, generator=g)
    # A 16-bit cache: the fused kernel rounds the query and its probabilities to it (hence the
    # looser tolerance there); float32: exact to rounding.
    q = rows.to(kv_dtype).double()
    scores = (q @ keys.double().transpose(-1, -2)) * 0.3
    want = torch.softmax(scores, -1) @ values.double()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        sdpa.SPLIT_FROM, split_from = 1, sdpa.SPLIT_FROM  # every pass in parts where threads share heads unevenly
        got = sdpa.one_query_pass(rows, keys, values, 0.3, flash=True)
    finally:
        sdpa.SPLIT_FROM = split_from
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    tolerance = 1e-5 if kv_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
