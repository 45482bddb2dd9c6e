"""The fast decoding step (lminf.fast_decode) against the dense float64 reference and the
model's own forward: the same logits at every step, the same cache, for every strategy
(those it does not apply to fall back to the forward, with a reason)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lminf
from lminf.fast_decode import FAMILIES, FastStep, why_not
from lminf.generation import cache_kwarg, decoder
from tests.conftest import tiny_model
from tests.reference import reference_attention
from tests.strategies import CASES

torch.set_grad_enabled(False)
FP32 = dict(rtol=1e-4, atol=1e-4)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def decoded(model, ids: torch.Tensor, prompt: int, cache=None, n_global=None) -> torch.Tensor:
    """Logits (1, n - prompt + 1, vocab) of a prompt's last token, then of each later token fed one at a time."""
    cache = lminf.make_cache(model, n_global=n_global) if cache is None else cache
    extra = {} if n_global is None else {"lminf_n_global": n_global}
    first = model(ids[:, :prompt], **cache_kwarg(model, cache), **extra).logits[:, -1]
    step = decoder(model, cache, n_global)
    return torch.stack([first, *(step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1]))], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prompt", [13, 1])  # past the window already; one token, the cache fills while decoding
def test_decoding_equals_the_dense_reference(family, case, prompt):
    strategy = CASES[case]
    model = lminf.patch(tiny_model(family), strategy)
    cache = lminf.make_cache(model)
    fast = strategy.name in ("lminf", "sinks", "lminf-original") and not strategy.keeps_middle
    assert (why_not(model, cache) is None) == fast, why_not(model, cache)
    assert isinstance(decoder(model, cache), FastStep) == fast
    ids = tokens(50)  # the ring of 8 wraps several times
    got = decoded(model, ids, prompt, cache)
    reference = lminf.patch(tiny_model(family), strategy, backend=reference_attention)
    if strategy.same_across_calls:
        ref = reference(ids).logits[:, prompt - 1 :]
    else:  # its output depends on the split into calls (by design): the reference over the same calls
        ref = decoded(reference, ids, prompt, DynamicCache())
    torch.testing.assert_close(got, ref, **FP32)
    assert cache.get_seq_length() == 50


@pytest.mark.parametrize("strategy", ["lminf", "sinks"])
def test_fast_step_runs_the_windows_without_first_tokens_too(strategy):
    # n_global 0: no far key ever; n_local 1: the query sees only itself
    for settings in ({"n_global": 0, "n_local": 8}, {"n_global": 3, "n_local": 1}):
        model = lminf.patch(tiny_model("llama"), strategy, **settings)
        ids = tokens(30, seed=1)
        assert isinstance(decoder(model, lminf.make_cache(model)), FastStep)
        got = decoded(model, ids, 5)
        ref = lminf.patch(tiny_model("llama"), strategy, backend=reference_attention, **settings)(ids).logits[:, 4:]
        torch.testing.assert_close(got, ref, **FP32)


def test_pinned_first_tokens():
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8)
    ids = tokens(40, seed=2)
    got = decoded(model, ids, 10, n_global=6)
    want = model(ids, lminf_n_global=6).logits[:, 9:]
    torch.testing.assert_close(got, want, **FP32)
    assert not torch.allclose(got, model(ids).logits[:, 9:], **FP32)  # pinning changed something


def test_sixteen_bit_cache_equals_the_forward():
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8, kv_dtype=torch.bfloat16)
    ids = tokens(40, seed=3)
    fast_cache, plain_cache = lminf.make_cache(model), lminf.make_cache(model)
    assert isinstance(decoder(model, fast_cache), FastStep)
    got = decoded(model, ids, 13, fast_cache)
    first = model(ids[:, :13], **cache_kwarg(model, plain_cache)).logits[:, -1:]
    steps = [model(ids[:, t : t + 1], **cache_kwarg(model, plain_cache)).logits[:, -1:] for t in range(13, 40)]
    # softmax weights rounded to bfloat16 per pass (the forward rounds two passes, then merges)
    torch.testing.assert_close(got, torch.cat([first, *steps], 1), rtol=1e-2, atol=5e-3)
    for fast_layer, plain_layer in zip(fast_cache.layers, plain_cache.layers, strict=True):  # the same cache afterwards
        assert fast_layer.keys.dtype == torch.bfloat16
        torch.testing.assert_close(fast_layer.keys, plain_layer.keys, rtol=1e-2, atol=1e-2)


def test_where_it_does_not_apply_it_says_why():
    sliding = lminf.patch(tiny_model("mistral-sliding"), "lminf", n_global=3, n_local=8)
    assert "sliding" in why_not(sliding, lminf.make_cache(sliding))
    gemma = lminf.patch(tiny_model("gemma"), "lminf", n_global=3, n_local=8)
    assert "model type" in why_not(gemma, lminf.make_cache(gemma))
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8)
    padded = lminf.make_cache(model, torch.tensor([[0, 0, 1, 1]]))
    assert "padding" in why_not(model, padded)
    assert "not patched" in why_not(tiny_model("llama"), padded)
    with pytest.raises(ValueError, match="cannot run here: the cache keeps room for padding"):
        FastStep(model, padded)
    with pytest.raises(ValueError, match=r"shape \(1, 1\)"):
        FastStep(model, lminf.make_cache(model))(tokens(2))
    referenced = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8, backend=reference_attention)
    assert "backend" in why_not(referenced, lminf.make_cache(referenced))


@pytest.mark.slow  # the default model, as loaded (input-major weights), and its GGUF 4-bit weights
@pytest.mark.parametrize("weights", ["dense", "gguf"])
def test_default_model_decodes_the_same(weights):
    model, tokenizer = lminf.load_default(weights=weights)
    lminf.patch(model, "lminf", n_global=4, n_local=64)
    ids = tokenizer(open(__import__("_pydecimal").__file__).read()[:3000], return_tensors="pt").input_ids[:, :120]
    fast_cache, plain_cache = lminf.make_cache(model), lminf.make_cache(model)
    assert isinstance(decoder(model, fast_cache), FastStep)
    got = decoded(model, ids, 40, fast_cache)
    first = model(ids[:, :40], **cache_kwarg(model, plain_cache)).logits[:, -1:]
    steps = [model(ids[:, t : t + 1], **cache_kwarg(model, plain_cache)).logits[:, -1:] for t in range(40, 120)]
    want = torch.cat([first, *steps], 1)
    if weights == "dense":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    else:  # the 4-bit kernel rounds its inputs to bfloat16, so float32 noise grows to bfloat16 noise
        assert float((got - want).norm() / want.norm()) < 2e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))
