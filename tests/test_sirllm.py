"""SirLLM (strategy `sirllm`): which tokens its cache keeps, the scores it keeps them by, its
turns, and a turn longer than the cache. Its attention is in the conformance suite
(tests/test_strategies.py), against the dense reference over the keys the cache kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lminf
from lminf.caches.turn_cache import TurnCache, kept_indices
from lminf.generation import cache_kwarg
from lminf.serve.session import Sampling, Session, stream_tokens
from lminf.strategies.sirllm import SirLLM
from tests.helpers import FP32, tiny_model, tokens

torch.set_grad_enabled(False)


def rule_keeps(scores: list[float], start: int, n_scored: int, recent: int, coming: int) -> list[int]:
    """The eviction rule as stated, row by row: when the stored tokens and the coming ones exceed
    the cache, keep the (n_scored - coming) best scores (ties: the earlier token), the first
    `start`, then the newest others until cache - coming remain, in their order."""
    n, cache = len(scores), start + n_scored + recent
    if n + coming <= cache:
        return list(range(n))
    best = sorted(range(n), key=lambda t: -scores[t])[: max(0, n_scored - coming)]  # sorted() is stable
    kept = set(best) | set(range(min(start, n)))
    for t in reversed(range(n)):
        if len(kept) >= cache - coming:
            break
        kept.add(t)
    return sorted(kept)


def filled(strategy: SirLLM, scores: torch.Tensor, heads: int = 2) -> TurnCache:
    """A cache of two layers holding len(scores[0]) tokens whose keys name their positions."""
    cache = TurnCache([strategy.cache_layer() for _ in range(2)])
    B, n = scores.shape
    for layer in cache.layers:
        key = torch.arange(n, dtype=torch.float64).expand(B, heads, n)[..., None].repeat(1, 1, 1, 4)
        layer.update(key, -key)
    cache.record(scores, torch.zeros(B, 5))
    return cache


def feed(cache: TurnCache, scores: torch.Tensor) -> None:
    """Store tokens with these scores (B, m) as a call would, after making room."""
    cache.make_room(scores.shape[1])
    for layer in cache.layers:
        seen = layer.seen
        key = torch.arange(seen, seen + scores.shape[1], dtype=torch.float64).expand(scores.shape[0], 2, -1)[..., None]
        layer.update(key.repeat(1, 1, 1, 4), -key.repeat(1, 1, 1, 4))
    cache.record(scores, torch.zeros(scores.shape[0], 5))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_eviction_keeps_what_the_rule_says(data):
    start, n_scored, recent = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
    if n_scored + recent == 0:
        recent = 1
    strategy = SirLLM(n_global=start, n_scored=n_scored, n_local=recent)
    bound = strategy.cache_bound()
    n = data.draw(st.integers(1, bound))
    coming = data.draw(st.integers(1, n_scored + recent))
    rows = data.draw(st.integers(1, 3))
    row = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]), min_size=n, max_size=n)  # few values: ties are common
    scores = torch.tensor(data.draw(st.lists(row, min_size=rows, max_size=rows)), dtype=torch.float64)
    cache = filled(strategy, scores)
    cache.make_room(coming)
    for b in range(rows):
        want = rule_keeps(scores[b].tolist(), start, n_scored, recent, coming)
        for layer in cache.layers:
            assert layer.positions[b].tolist() == want
            assert layer.keys[b, :, :, 0].eq(torch.tensor(want, dtype=torch.float64)).all()  # keys moved with them
            assert layer.values[b, :, :, 0].eq(-torch.tensor(want, dtype=torch.float64)).all()
        assert cache.scores[b].tolist() == scores[b, want].tolist()
    assert cache.stored() + coming <= bound


def test_kept_indices_breaks_ties_toward_the_earlier_token():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 0.0]])
    assert kept_indices(scores, n_global=0, n_best=2, target=2).tolist() == [[1, 2]]


def test_decay_follows_the_eviction_of_its_turn():
    """The turn's eviction reads the scores as they were; only then are they decayed (with decay
    0 the other order would leave only ties, and keep the earliest tokens)."""
    strategy = SirLLM(n_global=1, n_scored=3, n_local=1, decay=0.0)
    cache = filled(strategy, torch.tensor([[1.0, 9.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    cache.begin_turn(2)  # room for 2: the best one, the first token, the newest to fill 3
    assert cache.scored[0].positions.tolist() == [[0, 1, 4]]
    assert cache.scores.tolist() == [[0.0, 0.0, 0.0]]


def test_a_turn_decays_once_a_bare_call_not_at_all():
    strategy = SirLLM(n_global=1, n_scored=4, n_local=4, decay=0.5)
    cache = filled(strategy, torch.tensor([[4.0, 2.0]], dtype=torch.float64))
    feed(cache, torch.tensor([[8.0]]))  # a call without a turn: no decay
    assert cache.scores.tolist() == [[4.0, 2.0, 8.0]]
    cache.begin_turn(1)
    assert cache.scores.tolist() == [[2.0, 1.0, 4.0]]


def key_survives(decay: float, turns: int = 20) -> int:
    """A scripted episode: a key statement (4 tokens of high score) then `turns` distractor turns
    of 6 tokens (lower scores); -> how many distractor turns the key statement outlived."""
    strategy = SirLLM(n_global=2, n_scored=12, n_local=6, decay=decay)  # a turn of 6 leaves 6 best-scored
    gen = torch.Generator().manual_seed(0)
    cache = filled(strategy, torch.full((1, 2), 5.0, dtype=torch.float64))
    cache.begin_turn(4)
    feed(cache, torch.full((1, 4), 12.0, dtype=torch.float64))  # the key statement: positions 2..5
    for t in range(turns):
        cache.begin_turn(6)
        if not set(range(2, 6)) <= set(cache.scored[0].positions[0].tolist()):
            return t
        feed(cache, 1.0 + 6.0 * torch.rand(1, 6, generator=gen, dtype=torch.float64))
    return turns


def test_a_key_statement_survives_distractors_unless_it_decays():
    assert key_survives(decay=1.0) == 20
    assert key_survives(decay=0.7) < 20


def direct_scores(logits, ids, mode, previous=None):
    """-log softmax, token by token, as the two modes define a call's scores."""
    logp = torch.log_softmax(logits.double(), -1)
    B, m, _ = logits.shape
    out = torch.zeros(B, m, dtype=torch.float64)
    for b in range(B):
        if mode == "surprisal":  # -log p(x_i | x_<i): the prediction made at i - 1
            rest = [-logp[b, i - 1, ids[b, i]] for i in range(1, m)]
            if previous is not None:
                first = -torch.log_softmax(previous[b].double(), -1)[ids[b, 0]]
            else:
                first = max(rest) if rest else torch.tensor(0.0)
        else:  # the released code: the prediction made at i evaluated on x_i, shifted right by one
            made_at = [-logp[b, i, ids[b, i]] for i in range(m)]
            first, rest = max(made_at), made_at[:-1]
        out[b] = torch.tensor([float(first), *map(float, rest)])
    return out


@pytest.mark.parametrize("mode", ["surprisal", "released"])
@pytest.mark.parametrize("m", [1, 2, 7, 300])  # 300: past one block of rows
def test_scores_are_minus_log_p_as_each_mode_defines(mode, m):
    gen = torch.Generator().manual_seed(m)
    logits, ids = torch.randn(2, m, 11, generator=gen) * 3, torch.randint(0, 11, (2, m), generator=gen)
    strategy = SirLLM(score=mode)
    scores, last = strategy.token_scores(logits, ids, None)
    torch.testing.assert_close(scores, direct_scores(logits, ids, mode), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, torch.log_softmax(logits[:, -1], -1))
    previous = torch.randn(2, 11, generator=gen)
    scores, _ = strategy.token_scores(logits, ids, torch.log_softmax(previous, -1))
    torch.testing.assert_close(scores, direct_scores(logits, ids, mode, previous), rtol=1e-6, atol=1e-6)


def test_released_scores_are_shifted_by_one():
    """The released code's score of token i is the surprisal of token i - 1 (read at i - 1 of
    the prediction for token i): it equals the paper's where a token is repeated."""
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 3, 5, 5, 7, 7]])
    paper, _ = SirLLM(score="surprisal").token_scores(logits, ids, None)
    released, _ = SirLLM(score="released").token_scores(logits, ids, None)
    logp = torch.log_softmax(logits[0].double(), -1)
    assert torch.allclose(released[0, 2], -logp[1, 3]) and torch.allclose(paper[0, 2], -logp[1, 5])
    assert torch.allclose(released[0, [1, 3, 5]], paper[0, [1, 3, 5]])  # x_i == x_{i-1}: the two agree
    assert not torch.allclose(released[0, [2, 4]], paper[0, [2, 4]])


def test_the_model_records_every_tokens_score_and_returns_what_was_asked():
    model = lminf.patch(tiny_model(), SirLLM(n_global=2, n_scored=6, n_local=4, score="released"))
    ids = tokens(9)
    cache = lminf.make_cache(model)
    out = model(ids, **cache_kwarg(model, cache), logits_to_keep=1)
    assert out.logits.shape == (1, 1, 128)
    full = lminf.patch(tiny_model(), SirLLM(n_global=2, n_scored=6, n_local=4))(ids).logits  # a whole call: plain causal
    torch.testing.assert_close(out.logits, full[:, -1:], **FP32)
    torch.testing.assert_close(cache.scores, direct_scores(full, ids, "released"), **FP32)


def test_other_strategies_keep_their_logits_to_keep(monkeypatch):
    """Only a strategy that scores asks the model for every position's logits."""
    asked = []
    for name in ("sinks", "sirllm"):
        model = tiny_model()
        original = type(model).forward

        def spy(self, *args, logits_to_keep=0, original=original, **kwargs):
            asked.append(logits_to_keep)
            return original(self, *args, logits_to_keep=logits_to_keep, **kwargs)

        monkeypatch.setattr(type(model), "forward", spy)
        lminf.patch(model, name, n_local=8)
        cache = lminf.make_cache(model)
        assert model(tokens(5), **cache_kwarg(model, cache), logits_to_keep=1).logits.shape[1] == 1
        monkeypatch.undo()
    assert asked == [1, 0]


def test_a_call_longer_than_the_cache_is_fed_in_pieces():
    """40 tokens into a 15-token cache (room 12): pieces of 6, each making room; the same as
    feeding those pieces one call at a time, within the bound."""
    strategy = SirLLM(n_global=3, n_scored=8, n_local=4, decay=0.9)
    model = lminf.patch(tiny_model(), strategy)
    ids = tokens(45)
    cache = lminf.make_cache(model)
    model(ids[:, :5], **cache_kwarg(model, cache))
    whole = model(ids[:, 5:], **cache_kwarg(model, cache)).logits
    assert whole.shape[1] == 40 and cache.get_seq_length() == 45
    assert all(layer.keys.shape[-2] <= 15 for layer in cache.layers)

    by_hand = lminf.make_cache(model)
    model(ids[:, :5], **cache_kwarg(model, by_hand))
    pieces = [model(ids[:, a : min(a + 6, 45)], **cache_kwarg(model, by_hand)).logits for a in range(5, 45, 6)]
    torch.testing.assert_close(whole, torch.cat(pieces, dim=1), **FP32)
    torch.testing.assert_close(cache.scores, by_hand.scores)
    last_only = lminf.make_cache(model)
    model(ids[:, :5], **cache_kwarg(model, last_only))
    torch.testing.assert_close(model(ids[:, 5:], **cache_kwarg(model, last_only), logits_to_keep=2).logits, whole[:, -2:])
    with pytest.raises(ValueError, match="feed it in pieces"):
        cache.make_room(13)


def test_a_turn_longer_than_the_cache_generates():
    model = lminf.patch(tiny_model(), SirLLM(n_global=3, n_scored=8, n_local=4))
    out = model.generate(tokens(40), max_new_tokens=20, do_sample=False)  # a turn of 60 tokens
    assert out.shape == (1, 60)
    session = Session(model, n_global=3)
    got = [t for t in stream_tokens(model, session, tokens(30)[0].tolist(), Sampling(max_new_tokens=25), set()) if t is not None]
    assert len(got) == 25 and session.cache.stored() <= 15


def test_generate_prefill_and_sessions_announce_their_turns(monkeypatch):
    turns = []
    monkeypatch.setattr(TurnCache, "begin_turn", lambda self, n: turns.append(n))
    model = lminf.patch(tiny_model(), SirLLM(n_global=2, n_scored=30, n_local=30))
    model.generate(tokens(12), max_new_tokens=5, do_sample=False)
    cache = lminf.make_cache(model)
    lminf.prefill(model, tokens(9), cache, chunk_size=4)
    model.generate(tokens(14), **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    session = Session(model, n_global=2)
    for turn in ([5, 6, 7], [8, 9]):
        list(stream_tokens(model, session, turn, Sampling(max_new_tokens=4), set()))
    # generate: prompt + new; prefill: its input (once, whatever its chunks); a passed cache: the
    # unseen prompt tokens; a session: its unfed tokens (the last reply token too) + new
    assert turns == [12 + 5, 9, 14 - 9 + 3, 3 + 4, 1 + 2 + 4]


def test_token_nll_runs_through_the_scoring_forward():
    from lminf.generation import token_nll

    model = lminf.patch(tiny_model(), SirLLM(n_global=3, n_scored=8, n_local=4))
    ids = tokens(40)
    nll = token_nll(model, ids, lminf.make_cache(model), chunk_size=10, progress=False)
    cache = lminf.make_cache(model)
    logits = torch.cat([model(ids[:, a : min(a + 10, 39)], **cache_kwarg(model, cache)).logits for a in range(0, 39, 10)], dim=1)
    want = torch.nn.functional.cross_entropy(logits[0, :39], ids[0, 1:], reduction="none")
    torch.testing.assert_close(nll, want, **FP32)


def test_each_row_of_a_batch_keeps_its_own_tokens():
    """Rows score differently, so each row evicts its own tokens: a batch equals its rows alone."""
    model = lminf.patch(tiny_model(), SirLLM(n_global=2, n_scored=6, n_local=3))
    ids = tokens(30, batch=2, seed=3)

    def turns(rows):
        cache = lminf.make_cache(model)
        out = []
        for a, b in ((0, 9), *((t, t + 3) for t in range(9, 30, 3))):  # turns shorter than n_scored: some kept by score
            cache.begin_turn(b - a)
            out.append(model(rows[:, a:b], **cache_kwarg(model, cache)).logits)
        return torch.cat(out, dim=1), cache

    batched, cache = turns(ids)
    for b in range(2):
        alone, own = turns(ids[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, **FP32)
        assert cache.scored[0].positions[b].tolist() == own.scored[0].positions[0].tolist()
    assert cache.scored[0].positions[0].tolist() != cache.scored[0].positions[1].tolist()
