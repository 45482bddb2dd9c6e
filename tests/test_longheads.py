"""LongHeads' own promises, beside the conformance suite (tests/test_strategies.py), which holds
it to the dense reference in every family: the bound on what a query reads, settings checked,
the encoding phase leaving a query's own key out, summaries that do not depend on how the input
is split into calls, and heads that choose for themselves."""

from __future__ import annotations

import pytest
import torch

import lminf
from lminf.generation import cache_kwarg
from lminf.strategies.longheads import LongHeads
from tests.helpers import tiny_model, tokens

torch.set_grad_enabled(False)


@pytest.mark.parametrize("w, length, start", [(4, 12, 8), (4, 16, 16), (8, 32, 24), (3, 15, 15)])
def test_no_query_reads_more_than_the_attention_length(w, length, start):
    """Keys read per query head <= attention_length, and the farthest of them (the count read
    before the query, laid out contiguously) < attention_length."""
    strategy = LongHeads(chunk_tokens=w, attention_length=length, select_from=start)
    j = torch.arange(200)[None, None, :]
    for decoding in (False, True):
        i = torch.arange(150, 200)[None, :, None] if not decoding else torch.tensor([[[199]]])
        for q in range(i.shape[1]) if not decoding else [0]:
            rule = strategy.rule(i[:, q : q + 1] if decoding else i, j, layer=0)
            t = 0 if decoding else q
            assert not (rule.chunk_candidates[0, t] & rule.seen[0, t]).any()  # a chosen chunk is one not read anyway
            chosen = min(rule.top_chunks, int(rule.chunk_candidates[0, t].sum()) // w) * w
            reads = int(rule.seen[0, t].sum()) + chosen
            before = reads - int(rule.seen[0, t, i[0, t, 0]])
            assert reads <= length and before <= length - 1, (decoding, q, reads)
            p = int(i[0, t, 0])  # K - 1 chunks, and its own up to itself (decoding) or the token before
            assert reads == length - w + ((p + 1) % w if decoding else p % w), (decoding, p, reads)


def test_encoding_leaves_the_query_out_and_decoding_reads_it():
    strategy = LongHeads(chunk_tokens=4, attention_length=16, select_from=16)
    j = torch.arange(30)[None, None, :]
    encoding = strategy.rule(torch.arange(20, 30)[None, :, None], j, 0)
    decoding = strategy.rule(torch.tensor([[[25]]]), j, 0)
    assert not encoding.seen[0, torch.arange(10), torch.arange(20, 30)].any()
    assert bool(decoding.seen[0, 0, 25])
    before = strategy.rule(torch.arange(0, 16)[None, :, None], j, 0)  # before select_from: plain causal
    assert bool(before.seen[0, torch.arange(16), torch.arange(16)].all()) and before.chunk_candidates is not None
    assert not before.chunk_candidates.any()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(attention_length=10), "multiple of chunk_tokens"),
        (dict(attention_length=8), "at least 3 chunks"),
        (dict(attention_length=16, select_from=6), "select_from"),
        (dict(attention_length=16, select_from=8), "select_from"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(attention_length=128), "training length"),
    ],
)
def test_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        lminf.patch(tiny_model(), LongHeads(**{"chunk_tokens": 4, **settings}))


def test_alibi_models_are_refused():
    with pytest.raises(ValueError, match="ALiBi"):
        lminf.patch(tiny_model("mpt"), LongHeads(chunk_tokens=4, attention_length=16))


def test_summaries_do_not_depend_on_how_the_input_is_split():
    model = lminf.patch(tiny_model(), LongHeads(chunk_tokens=4, attention_length=16))
    ids = tokens(43)
    whole, parts = lminf.make_cache(model), lminf.make_cache(model)
    model(ids, **cache_kwarg(model, whole))
    for a in range(0, 43, 5):
        model(ids[:, a : a + 5], **cache_kwarg(model, parts))
    for one, other in zip(whole.layers, parts.layers, strict=True):
        assert one.summaries.shape[2] == 10  # finished chunks of 4 in 43 tokens
        torch.testing.assert_close(one.summaries, other.summaries, rtol=1e-5, atol=1e-5)
        assert one.queries.shape[-2] == other.queries.shape[-2] == 3  # the unfinished chunk's queries only


@pytest.mark.model
def test_heads_choose_their_own_chunks(monkeypatch):
    """On the default model the query heads of one layer do not all read the same chunks."""
    choices = []
    choose = LongHeads.choose

    def recording(self, *args):
        chunks = choose(self, *args)
        choices.append(chunks)
        return chunks

    monkeypatch.setattr(LongHeads, "choose", recording)
    model, _ = lminf.load_default(torch.float32)
    ids = torch.randint(100, 20000, (1, 800), generator=torch.Generator().manual_seed(0))
    lminf.patch(model, LongHeads(chunk_tokens=32, attention_length=192))(ids)
    chunks = torch.cat([c[0].flatten(1, 2) for c in choices], 1)  # (Hq, queries over layers and groups, R)
    differs = (chunks != chunks[:1]).any(-1).any(0)  # per query: some head reads other chunks than head 0
    assert float(differs.float().mean()) > 0.5
