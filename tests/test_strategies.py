"""One conformance suite, parametrized over every registered strategy (tests/strategy_cases.py)
and every supported model family: what each strategy promises inside a real model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lminf
from lminf.generation import cache_kwarg
from lminf.patching import layer_strategy
from lminf.strategies import STRATEGIES, Strategy
from tests.helpers import FP32, tiny_model, tokens
from tests.reference import reference_attention
from tests.strategy_cases import CASES, with_sizes

torch.set_grad_enabled(False)


@pytest.fixture(params=sorted(CASES))
def strategy(request) -> Strategy:
    return CASES[request.param]


def patched_model(family: str, strategy: Strategy, **kwargs):
    """A tiny `family` model patched with `strategy`; skips a family the strategy refuses by design
    (longheads: ALiBi), once that refusal is a clear error."""
    model = tiny_model(family)
    try:
        return lminf.patch(model, strategy, **kwargs)
    except ValueError as error:
        if "ALiBi" not in str(error):
            raise
        pytest.skip(f"refused by design: {error}")


def test_every_registered_strategy_is_tested():
    assert {s.name for s in CASES.values()} == set(STRATEGIES)


def test_equals_vanilla_within_the_window(family, strategy):
    model = patched_model(family, with_sizes(strategy, n_local=None))  # its default: the training length (64) or a part
    ids = tokens(min(60, lminf.settings_of(model).plain_up_to()))
    patched = model(ids).logits
    lminf.unpatch(model)
    torch.testing.assert_close(patched, model(ids).logits, **FP32)


def test_fast_path_equals_reference_in_model(family, strategy):
    ids = tokens(45, batch=2)  # several windows past n_local
    fast = patched_model(family, strategy)(ids).logits
    ref = patched_model(family, strategy, backend=reference_attention)(ids).logits
    torch.testing.assert_close(fast, ref, **FP32)


@pytest.mark.parametrize("prompt", [13, 1])  # longer than the window; one token, then decoding fills the cache
def test_cached_decoding_equals_one_full_forward(family, strategy, prompt):
    model = patched_model(family, strategy)
    ids = tokens(50)

    def in_calls(model, cache):  # a prompt, then token by token, then two chunks
        through = cache_kwarg(model, cache)
        steps = [model(ids[:, :prompt], **through).logits]
        steps += [model(ids[:, t : t + 1], **through).logits for t in range(prompt, 30)]
        steps += [model(ids[:, 30:41], **through).logits, model(ids[:, 41:], **through).logits]
        return torch.cat(steps, dim=1)

    cache = lminf.make_cache(model)
    got = in_calls(model, cache)
    if strategy.same_across_calls:
        want = model(ids, use_cache=False).logits
    else:  # its output depends on the split into calls (by design): the dense reference over the same calls,
        # through the strategy's own cache where it evicts by its own state (SirLLM: the rule reads the kept keys)
        reference = patched_model(family, strategy, backend=reference_attention)
        want = in_calls(reference, lminf.make_cache(reference) if strategy.stateful else DynamicCache())
    torch.testing.assert_close(got, want, **FP32)
    assert cache.get_seq_length() == 50
    for i, layer in enumerate(cache.layers):  # each layer within its own bound (a sliding layer: the model's window)
        bound = layer_strategy(model, i).cache_bound()
        assert bound is None or layer.keys.shape[-2] <= bound < 50


def test_left_padded_rows_equal_rows_alone(strategy):
    model = lminf.patch(tiny_model("llama"), strategy)
    rows = [tokens(30, seed=1)[0], tokens(19, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1

    if not strategy.pads:  # refused, with a clear error, in a forward call and in generate()
        with pytest.raises(ValueError, match="padded batches"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="padded batches"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
        return
    batched = model(ids, attention_mask=mask).logits
    for b, r in enumerate(rows):
        torch.testing.assert_close(batched[b, width - len(r) :], model(r[None]).logits[0], **FP32)

    # generate() with its default cache, past the window, greedy; the prompt through the cache in chunks changes nothing
    greedy = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=mask, **greedy)
    if strategy.same_across_calls:  # else chunks are calls, and change what it computes (by design)
        chunked = model.generate(ids, attention_mask=mask, prefill_chunk=3, **greedy)
        torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(out.scores), **FP32)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], **greedy)
        assert torch.equal(out.sequences[b, width:], alone.sequences[0, len(r) :])
        torch.testing.assert_close(torch.stack(out.scores)[:, b], torch.stack(alone.scores)[:, 0], **FP32)


def test_memory_stays_within_the_bound_the_strategy_promises(strategy):
    model = lminf.patch(tiny_model("llama"), strategy)
    cache = lminf.make_cache(model)
    ids = tokens(600)
    model(ids[:, :100], **cache_kwarg(model, cache))
    for t in range(100, 600):
        model(ids[:, t : t + 1], **cache_kwarg(model, cache))
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # K, V fp32
    assert cache.get_seq_length() == 600
    bound = lminf.settings_of(model).cache_bound()
    if bound is None:  # the strategy keeps every token (top-k), by design
        assert all(layer.keys.shape[-2] == 600 for layer in cache.layers)
        return
    assert bound < 600 and all(layer.keys.shape[-2] <= bound for layer in cache.layers)
    assert cache.memory_bytes() <= bound * per_token


def test_kept_pairs_are_the_pairs_the_rule_keeps(strategy):
    for n_global in (0, 3, 6):
        for n_local in (1, 5, 30):
            varied = with_sizes(strategy, n_global=n_global, n_local=n_local)
            for length in range(1, 81):
                for layer in (0, 1):  # lminf-top2 picks from layer 1 on
                    counted = Strategy.kept_pairs(varied, length, layer)
                    assert varied.kept_pairs(length, layer) == counted, (n_global, n_local, length, layer)


@pytest.mark.parametrize("q_start, total", [(0, 5), (3, 9), (20, 21), (30, 45), (44, 45)])
def test_keys_it_says_it_reads_are_enough(strategy, q_start, total):
    """An engine that gathers only `keys_for` from its own cache (vLLM) gets the same output."""
    from lminf.layout import Layout
    from lminf.strategies import AttentionCall

    if strategy.stateful:  # it reads its own cache; the vLLM plugin refuses it (tests/test_vllm.py)
        with pytest.raises(NotImplementedError):
            strategy.keys_for(q_start, total)
        return
    gen = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(1, h, n, 8, generator=gen) for h, n in ((4, total - q_start), (2, total), (2, total)))
    call = AttentionCall(layer=2, inv_freq=1.0 / 10.0 ** (torch.arange(4) / 4), scaling=8**-0.5)
    everything = torch.arange(total)[None]
    full = strategy.attention(
        q, k, v, Layout(everything[:, q_start:], everything, torch.ones_like(everything, dtype=torch.bool)), call
    )
    first_end, tail = strategy.keys_for(q_start, total)
    kept = torch.cat((torch.arange(first_end), torch.arange(tail, total)))
    layout = Layout(everything[:, q_start:], kept[None], torch.ones(1, len(kept), dtype=torch.bool))
    torch.testing.assert_close(strategy.attention(q, k[:, :, kept], v[:, :, kept], layout, call), full, rtol=1e-5, atol=1e-5)
    if strategy.cache_bound() is not None:
        assert len(kept) <= strategy.cache_bound() + (total - q_start)


def test_plain_attention_up_to_where_it_says(strategy):
    """Up to `plain_up_to` tokens the rule is plain causal attention (engines run their own
    kernel there): every earlier key seen, at its true distance, none left to pick from."""
    n = strategy.plain_up_to()
    i, j = torch.arange(n)[None, :, None], torch.arange(n)[None, None, :]
    rule, causal = strategy.rule(i, j, layer=2), j <= i
    assert n > 0 and rule.seen[causal].all() and (rule.distance == i - j)[causal].all()
    assert not rule.candidates[causal].any()
    assert rule.block is None or not (rule.block[causal] >= 0).any()
