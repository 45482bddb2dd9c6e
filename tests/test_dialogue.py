"""The dialogue-memory tasks (lminf.eval.dialogue): how episodes are built, the released
loop's choice rule, and that a turn keeps the cache of the choice it picked."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import lminf
from lminf.eval.dialogue import (
    GROCERIES,
    THROWS,
    choose,
    continuation_scores,
    encode,
    grocery_episode,
    play,
    rps_throws,
    rps_turn,
    within,
)
from lminf.eval.methods import Patched, SegmentWise, Vanilla, Window, resolve_all, strategy_methods
from lminf.generation import cache_kwarg
from lminf.strategies import build
from tests.helpers import tiny_model, tokens

torch.set_grad_enabled(False)


@pytest.mark.parametrize("seed", range(5))
def test_grocery_episode_key_first_recall_last(seed: int) -> None:
    turns = grocery_episode(random.Random(seed), 7)
    key_turn, *distractors, recall = turns
    assert key_turn.kind == "key" and key_turn.choices == ("OK",)
    key = key_turn.question.removeprefix("I want you to buy the GROCERY: ")
    assert key in GROCERIES
    assert len(distractors) == 7 and all(t.kind == "distractor" for t in distractors)
    assert len({t.question for t in distractors}) == 7  # no question asked twice
    for turn in distractors:
        assert len(turn.choices) == 4 and turn.answer is not None
        assert all(f") {choice}" in turn.question for choice in turn.choices)  # the options are listed in the question
    assert recall.kind == "recall" and recall.question.startswith("Which one is the GROCERY that I want you to buy earlier?")
    assert len(recall.choices) == 4 and recall.choices.count(key) == 1
    assert recall.choices[recall.answer] == key
    assert len(set(recall.choices)) == 4 and all(c in GROCERIES for c in recall.choices)


def test_episodes_reproducible_from_the_seed() -> None:
    assert grocery_episode(random.Random("0/grocery/3"), 10) == grocery_episode(random.Random("0/grocery/3"), 10)
    episodes = {grocery_episode(random.Random(f"0/grocery/{e}"), 10)[0].question for e in range(12)}
    assert len(episodes) > 4  # the key varies between episodes
    assert rps_throws(random.Random(1), "paper", 40) == rps_throws(random.Random(1), "paper", 40)
    assert rps_throws(random.Random(1), "paper", 40) != rps_throws(random.Random(2), "paper", 40)


@pytest.mark.parametrize("dominant", THROWS)
def test_rps_dominant_throw_is_half(dominant: str) -> None:
    throws = rps_throws(random.Random(0), dominant, 101)
    assert len(throws) == 101 and throws.count(dominant) == 50
    assert set(throws) == set(THROWS)
    assert rps_turn(None).choices == THROWS and "I chose [rock]." in rps_turn("rock").question


def test_choice_rule() -> None:
    # a greedy match wins over a higher first-token log-probability; the first match if several
    assert choose([-3.0, -1.0, -2.0], [False, False, True]) == 2
    assert choose([-3.0, -1.0, -2.0], [True, False, True]) == 0
    # no match: the highest first-token log-probability, the first on ties
    assert choose([-3.0, -1.0, -2.0], [False, False, False]) == 1
    assert choose([-1.0, -3.0, -1.0], [False, False, False]) == 0
    # greedy=False (Rock-Paper-Scissors) ignores the matches
    assert choose([-3.0, -1.0, -2.0], [False, False, True], greedy=False) == 1


def test_continuation_scores_against_float64() -> None:
    torch.manual_seed(0)
    context, vocab = 5, 11
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    logits = torch.randn(len(ids), vocab, dtype=torch.float64)
    for t in range(context, len(ids)):  # the prediction at t - 1 is the token at t: a greedy match
        logits[t - 1, ids[t]] = 10.0
    first, match = continuation_scores(logits.float(), ids, context)
    reference = torch.log(torch.softmax(logits[context - 1], -1))[ids[context]]
    assert first == pytest.approx(float(reference), abs=1e-5)
    assert match
    logits[len(ids) - 2, ids[-1]] = -10.0  # the last choice token is no longer the greedy one
    first_again, match = continuation_scores(logits.float(), ids, context)
    assert not match and first_again == pytest.approx(first, abs=1e-6)


def _forward(model, cache, row: list[int]) -> torch.Tensor:
    return model(torch.tensor([row]), **cache_kwarg(model, cache), use_cache=True).logits[0]


@pytest.mark.parametrize("strategy", ["sirllm", "sinks"])
def test_play_keeps_the_chosen_choices_cache(strategy: str) -> None:
    """The turn's pick is the rule applied to each choice run alone on a copy of the announced
    cache, and the cache it returns is that choice's: the next forward sees the same logits."""
    model = tiny_model("llama", max_position_embeddings=256)
    settings = {"n_global": 2, "n_scored": 20, "n_local": 4} if strategy == "sirllm" else {"n_global": 2, "n_local": 24}
    lminf.patch(model, build(strategy, **settings))
    picked_other = False
    for seed in range(8):
        cache = lminf.make_cache(model)
        _forward(model, cache, tokens(30, seed=100 + seed)[0].tolist())  # past turns, past the cache size
        context = tokens(6, seed=200 + seed)[0].tolist()
        rows = [context + tokens(3, seed=300 + 10 * seed + c)[0].tolist() for c in range(3)]
        announced = copy.deepcopy(cache)
        lminf.begin_turn(announced, max(map(len, rows)))
        alone = [copy.deepcopy(announced) for _ in rows]
        scored = [continuation_scores(_forward(model, c, row), row, len(context)) for c, row in zip(alone, rows, strict=True)]
        expected = choose([s[0] for s in scored], [s[1] for s in scored])
        before = [layer.keys.clone() for layer in cache.layers]

        chosen, kept = play(model, cache, rows, len(context))

        assert chosen == expected
        picked_other |= chosen != 0
        nxt = tokens(4, seed=400 + seed)[0].tolist()
        following = [_forward(model, c, nxt) for c in alone]  # the next turn's logits after each choice
        torch.testing.assert_close(_forward(model, kept, nxt), following[chosen], rtol=0, atol=0)
        assert all(not torch.equal(f, following[chosen]) for i, f in enumerate(following) if i != chosen)
        if strategy == "sinks":  # the cache the turn started from is not the one it returns
            assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers, strict=True))
    assert picked_other  # the check saw a pick other than the first choice


@pytest.mark.model
def test_encode_moves_the_space_to_the_choice(default_tokenizer) -> None:
    turn = grocery_episode(random.Random(0), 2)[-1]
    rows, context = encode(default_tokenizer, turn)
    for row, choice in zip(rows, turn.choices, strict=True):
        assert default_tokenizer.decode(row[:context]).endswith("\n\nASSISTANT:")
        assert default_tokenizer.decode(row[context:]) == f" {choice}"


def test_within_sizes_every_method_to_one_cache() -> None:
    """The dialogue cell compares methods at one cache size: each method's window (longheads:
    its attention length) becomes `tokens`, a bounded cache stays within it, and the sized
    method still resolves and plays a turn; methods without a cache of turns say why."""
    model = tiny_model(max_position_embeddings=1024, num_hidden_layers=5)  # longheads: 3 chunks; lminf-topk: layer 4
    top_k = {"lminf-topk": {"top_k": 5}}  # its preset leaves top_k to --top-k
    presets = [Patched(cls(**preset, **top_k.get(name, {})), name) for name, (cls, preset) in strategy_methods().items()]
    for method in resolve_all([Vanilla(), Window(), SegmentWise(), *presets], model):
        if method.name in ("window", "xl3m"):
            with pytest.raises(NotImplementedError, match="not a dialogue"):
                within(method, 64)
            continue
        sized = within(method, 64).resolved(model)
        if isinstance(sized, Vanilla):
            continue
        s = sized.strategy
        if method.name == "longheads":
            assert (s.attention_length, s.chunk_tokens) == (64, 8)
        else:
            assert s.n_global + s.n_local + getattr(s, "n_scored", 0) == 64, method.name
        bound = s.cache_bound()
        hot = (s.hot_blocks + 1) * s.block_size if method.name == "infllm" else 0  # its memory's blocks on the device
        assert bound is None or bound <= 64 + hot, method.name
        ids = tokens(100, seed=3)[0].tolist()
        with sized.patched(model):  # a turn of two choices after 90 tokens of context, past the cache
            play(model, sized.new_cache(model), [ids[:93], ids[:90] + ids[93:]], 90)
