"""InfLLM's block memory beyond what the conformance suite (tests/test_strategies.py) checks
for every strategy: retrieval finds the block that matches, the memory tiers hold what they
say, and their sizes or medium do not change a single logit."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lminf
from lminf.generation import cache_kwarg
from lminf.layout import Layout
from lminf.memory import cache_tiers
from lminf.strategies import AttentionCall
from lminf.strategies.infllm import InfLLM
from lminf.strategies.infllm.memory import CHUNK_BLOCKS, BlockStore
from tests.helpers import tiny_model, tokens

torch.set_grad_enabled(False)
SMALL = InfLLM(n_global=3, n_local=8, block_size=4, top_blocks=2, repr_topk=2, hot_blocks=2)


def stream(model, ids, cache, prompt: int = 20):
    """Logits of `ids` fed through `cache`: a prompt, then one token at a time."""
    steps = [model(ids[:, :prompt], **cache_kwarg(model, cache)).logits]
    steps += [model(ids[:, t : t + 1], **cache_kwarg(model, cache)).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1)


def test_a_query_reads_the_block_whose_keys_match_it():
    """Keys of one block far back point where the last query points: the query finds that
    block among many, and its output is that block's values; without memory it cannot."""
    strategy = InfLLM(n_global=2, n_local=16, block_size=8, top_blocks=1, repr_topk=2)
    gen = torch.Generator().manual_seed(0)
    n, D = 200, 16
    q, k = torch.randn(1, 2, n, D, generator=gen) * 0.1, torch.randn(1, 1, n, D, generator=gen) * 0.1
    v = torch.zeros(1, 1, n, D)
    target = range(2 + 5 * 8, 2 + 6 * 8)  # block 5, long out of the last query's window
    direction = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    k[0, 0, list(target)] += 4 * direction
    v[0, 0, list(target)] = 1.0
    q[0, :, -1] = 4 * direction
    everything = torch.arange(n)[None]
    layout = Layout(everything, everything, torch.ones(1, n, dtype=torch.bool))
    call = AttentionCall(layer=0, inv_freq=None, scaling=1.0)  # no rotary positions: the logit is q . k
    out = strategy.attention(q, k, v, layout, call)
    assert out[0, :, -1].min() > 0.9  # nearly all its attention on block 5
    without = InfLLM(n_global=2, n_local=16, block_size=8, top_blocks=0).attention(q, k, v, layout, call)
    assert without[0, :, -1].max() < 0.01


@pytest.mark.parametrize("position", ["rotary", "alibi", "softcap"])
@pytest.mark.parametrize("overhead", [0, 10**9], ids=["block by block", "union under a mask"])
def test_both_ways_of_reading_the_memory_equal_the_reference(position, overhead, monkeypatch):
    """A group of queries reads its chosen blocks block by block (only the queries that chose
    each) or as one masked pass over the union of their choices: both are the reference."""
    from lminf.strategies.infllm import attention
    from tests.reference import reference_attention

    monkeypatch.setattr(attention, "BLOCK_OVERHEAD", overhead)
    strategy = InfLLM(n_global=2, n_local=8, block_size=4, top_blocks=2, repr_topk=2, hot_blocks=3)
    gen = torch.Generator().manual_seed(1)
    n, D = 160, 8
    q, k, v = (torch.randn(2, h, n, D, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    everything = torch.arange(n)[None].expand(2, n)
    layout = Layout(everything, everything, torch.ones(2, n, dtype=torch.bool))
    call = AttentionCall(layer=0, inv_freq=1.0 / (10.0 ** (torch.arange(4) / 4)), scaling=D**-0.5)
    if position == "alibi":
        call = AttentionCall(layer=0, inv_freq=None, scaling=D**-0.5, alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    if position == "softcap":
        call = AttentionCall(layer=0, inv_freq=call.inv_freq, scaling=D**-0.5, softcap=2.0)
    got = strategy.attention(q, k, v, layout, call)
    torch.testing.assert_close(got, reference_attention(strategy, q, k, v, layout, call), rtol=1e-10, atol=1e-10)


def test_memory_lives_in_host_memory_and_the_device_holds_a_bound():
    model = lminf.patch(tiny_model("llama"), SMALL)
    cache, ids = lminf.make_cache(model), tokens(400)
    stream(model, ids, cache)
    c = model.config
    per_token = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # K and V, float32
    blocks = (400 - 1 - (3 + 8 - 1)) // 4  # in memory for the last query
    for layer in cache.layers:
        assert layer.n_blocks == blocks and layer.keys.shape[-2] <= 3 + 8 + 4
        assert layer.device_bytes() <= SMALL.cache_bound() * per_token
        assert layer.host_bytes() == -(-blocks // CHUNK_BLOCKS) * CHUNK_BLOCKS * 4 * per_token  # every block, whole chunks
        assert layer.store.hits > 0  # the hot cache serves repeated reads
    assert cache.memory_bytes() == sum(layer.device_bytes() for layer in cache.layers)
    tiers = cache_tiers(cache)  # what the evaluations record
    assert tiers["device_kv_mib"] == round(cache.memory_bytes() / 2**20, 1)
    assert tiers["host_kv_mib"] == round(sum(layer.host_bytes() for layer in cache.layers) / 2**20, 1)


def test_neither_the_hot_cache_size_nor_a_file_changes_the_output(tmp_path):
    ids = tokens(120)
    outputs = {}
    variants = {"hot 2": {}, "hot 1": {"hot_blocks": 1}, "hot 64": {"hot_blocks": 64}, "file": {"memory_dir": str(tmp_path)}}
    for name, settings in variants.items():
        model = lminf.patch(tiny_model("llama"), SMALL, **settings)
        cache = lminf.make_cache(model)
        outputs[name] = stream(model, ids, cache)
        if name == "file":
            assert list(tmp_path.iterdir()) == []  # mapped, then unlinked: nothing left behind
            assert cache.layers[0].host_bytes() > 0
    for name, logits in outputs.items():
        torch.testing.assert_close(logits, outputs["hot 2"], rtol=1e-5, atol=1e-5, msg=name)


def test_the_hot_cache_evicts_the_least_recently_used_block():
    store = BlockStore(hot=2)
    for b in range(4):
        store.add(torch.full((2, 1, 1, 3, 2), float(b)))
    like = torch.zeros(1)

    def slots(keys, block_in):  # block -> the value its slot holds
        return {int(b): float(keys[0, 0, 3 * s, 0]) for s, b in enumerate(block_in) if b >= 0}

    store.load([0, 1], like)
    store.load([0], like)  # 1 is now the least recently used
    keys, _, block_in = store.load([2], like)
    assert slots(keys, block_in) == {0: 0.0, 2: 2.0}
    keys, _, block_in = store.load([3, 2], like)  # 0 goes, not 2 that is asked for
    assert slots(keys, block_in) == {2: 2.0, 3: 3.0} and store.hits == 2
    with pytest.raises(ValueError, match="hot cache holds 2"):
        store.load([0, 1, 2], like)


def test_rows_of_a_batch_choose_their_own_blocks():
    model = lminf.patch(tiny_model("llama"), SMALL)
    ids = tokens(60, batch=2)
    batched = model(ids).logits
    for b in range(2):
        torch.testing.assert_close(batched[b], model(ids[b : b + 1]).logits[0], rtol=1e-4, atol=1e-4)


def test_clear_errors():
    model = lminf.patch(tiny_model("llama"), SMALL)
    cache = DynamicCache()
    model(tokens(10), **cache_kwarg(model, cache))  # one call holds every token: fine
    with pytest.raises(ValueError, match="lminf.make_cache"):
        model(tokens(1), **cache_kwarg(model, cache))
    for settings, message in (({"repr_topk": 5, "block_size": 4}, "cannot exceed"), ({"hot_blocks": 0}, "hot_blocks")):
        with pytest.raises(ValueError, match=message):
            InfLLM(**settings)
