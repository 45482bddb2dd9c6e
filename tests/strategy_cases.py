"""Every registered strategy with the settings the tests run it at (a new strategy adds its line here),
and random attention cases drawn from them.

Small windows, so that the tiny test models (64 positions) go several windows past them.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from lminf.layout import Layout
from lminf.strategies import AttentionCall, InfLLM, LMInfinite, Sinks
from lminf.strategies.lm_infinite_original import LMInfiniteOriginal
from lminf.strategies.longheads import LongHeads
from lminf.strategies.sirllm import SirLLM

CASES = {
    # blocks of 4 from position 3, in memory from position 14 on; 2 of them per query, 2 hot
    "infllm": InfLLM(n_global=3, n_local=8, block_size=4, top_blocks=2, repr_topk=2, hot_blocks=2),
    "lminf": LMInfinite(n_global=3, n_local=8),
    "lminf-top2": LMInfinite(n_global=3, n_local=8, top_k=2, top_k_from_layer=1),
    "sinks": Sinks(n_global=3, n_local=8),
    "lminf-original": LMInfiniteOriginal(n_global=3, n_local=8, top_k=2, top_k_from_layer=1, top_k_insert_at=5),
    # chunks of 4, 4 read per query head (first, previous, own and 1 chosen) from position 16 on
    "longheads": LongHeads(chunk_tokens=4, attention_length=16, select_from=16),
    "sirllm": SirLLM(n_global=3, n_scored=8, n_local=4, decay=0.9),  # a 15-token cache: 12 fit in one call
}


def with_sizes(strategy, **sizes):
    """`strategy` with the sizes it has among `sizes` replaced (longheads has no n_local)."""
    fields = {f.name for f in dataclasses.fields(strategy)}
    return dataclasses.replace(strategy, **{k: v for k, v in sizes.items() if k in fields})


def random_case(data):
    """Random strategy settings, heads, head dims (odd rotary fractions too), lengths, padding,
    and a cache-like eviction."""
    n_kv = data.draw(st.sampled_from([1, 2, 3]))
    rep = data.draw(st.sampled_from([1, 2, 3]))
    n_freq = data.draw(st.integers(1, 6))
    head_dim = 2 * n_freq + data.draw(st.sampled_from([0, 0, 3]))  # partial rotary: channels left alone
    n_global, n_local = data.draw(st.integers(0, 5)), data.draw(st.integers(1, 12))
    strategy = with_sizes(CASES[data.draw(st.sampled_from(sorted(CASES)))], n_global=n_global, n_local=n_local)
    batch = data.draw(st.integers(1, 3))
    total = data.draw(st.integers(1, 70))
    n_new = data.draw(st.integers(1, total))  # queries: the last n_new tokens
    pads = [data.draw(st.sampled_from([0, 0, 1, 4])) if total > 4 else 0 for _ in range(batch)]  # often none
    if strategy.stateful:  # without its cache it runs on a whole unpadded input only (InfLLM)
        n_new, pads = total, [0] * batch

    kept = torch.arange(total)
    first_end = n_global + max(pads)  # a bounded cache keeps [0, first_end): the first tokens and the left padding
    if data.draw(st.booleans()) and total - n_new - n_local > first_end and not strategy.stateful:  # as a bounded cache
        kept = torch.cat((torch.arange(first_end), torch.arange(total - n_new - n_local, total)))
    real_mask = torch.stack([torch.arange(total) >= p for p in pads])
    real = real_mask.long().cumsum(-1) - 1
    layout = Layout(q_pos=real[:, total - n_new :], k_pos=real[:, kept], k_valid=real_mask[:, kept])

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    # A strategy that chooses among keys by their scores runs in float64: a near tie must not flip a choice.
    dtype = torch.float64 if strategy.stateful else torch.float32
    q = torch.randn(batch, n_kv * rep, n_new, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, n_kv, len(kept), head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, n_kv, len(kept), head_dim, generator=gen, dtype=dtype)
    inv_freq = 1.0 / (10.0 ** (torch.arange(n_freq) / n_freq))
    kernel = data.draw(st.sampled_from(["torch", "flash_cpu"]))
    call = AttentionCall(layer=data.draw(st.integers(0, 2)), inv_freq=inv_freq, scaling=head_dim**-0.5, kernel=kernel)
    return strategy, q, k, v, layout, call, real_mask[:, total - n_new :]
