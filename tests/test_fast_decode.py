"""The fast decoding step (lminf.fast_decode) against the dense float64 reference and the
model's own forward: the same logits at every step, the same cache, for every strategy
(those it does not apply to fall back to the forward, with a reason)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lminf
from lminf import fast_decode
from lminf.fast_decode import FAMILIES, FastStep, why_not
from lminf.generation import cache_kwarg, decoder
from lminf.kernels import native, sdpa
from lminf.serve.session import Sampling, Session, stream_tokens
from tests.conftest import HAS_CXX
from tests.helpers import FP32, decoded, tiny_model, tokens
from tests.reference import reference_attention
from tests.strategy_cases import CASES

torch.set_grad_enabled(False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prompt", [13, 1])  # past the window already; one token, the cache fills while decoding
# lminf's C++ kernels (built here: the attention and the layers around it), torch's fused kernel and the modules
@pytest.mark.parametrize("attention", ["native", "flash_cpu"])
def test_decoding_equals_the_dense_reference(family, case, prompt, attention, monkeypatch):
    if attention == "flash_cpu":
        monkeypatch.setattr(native, "op", lambda: None)
    elif not HAS_CXX:
        pytest.skip("no C++ compiler to build lminf's kernel")
    decodes_as_the_reference(family, case, prompt, attention)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cpp_attention_under_the_modules_turns_the_far_keys(family, monkeypatch):
    # lminf's C++ attention with layers the C++ layers do not run (here: made not to fit): the
    # loop over the layers in Python, the far keys turned by the attention kernel as it reads them
    if not HAS_CXX:
        pytest.skip("no C++ compiler to build lminf's kernel")
    monkeypatch.setattr(fast_decode._NativeLayer, "fits", staticmethod(lambda model: False))
    decodes_as_the_reference(family, "lminf", 13, "native", layers="modules")


def decodes_as_the_reference(family: str, case: str, prompt: int, attention: str, layers: str | None = None) -> None:
    """The fast step's logits (where it applies; the forward elsewhere) against the dense float64 reference."""
    strategy = CASES[case]
    model = lminf.patch(tiny_model(family), strategy)
    cache = lminf.make_cache(model)
    fast = strategy.name in ("lminf", "sinks", "lminf-original") and not strategy.keeps_middle
    assert (why_not(model, cache) is None) == fast, why_not(model, cache)
    step = decoder(model, cache)
    assert isinstance(step, FastStep) == fast
    if fast:
        assert step.attention_kernel == attention
        layers = layers or ("native" if attention == "native" else "modules")
        assert step.layers_kernel == layers
        assert (step.stack is not None) == (layers == "native")  # every layer in one C++ call
    ids = tokens(50)  # the ring of 8 wraps several times
    got = decoded(model, ids, prompt, cache)
    reference = lminf.patch(tiny_model(family), strategy, backend=reference_attention)
    if strategy.same_across_calls:
        ref = reference(ids).logits[:, prompt - 1 :]
    else:  # its output depends on the split into calls (by design): the reference over the same calls
        ref = decoded(reference, ids, prompt, DynamicCache())
    torch.testing.assert_close(got, ref, **FP32)
    assert cache.get_seq_length() == 50


def test_the_pass_in_parts_decodes_the_same(monkeypatch):
    # Long passes run in parts so threads share them evenly (lminf.kernels.sdpa.one_query_pass):
    # here every pass, with 3 threads over the tiny models' 2 key heads (3 parts, keys left over).
    monkeypatch.setattr(sdpa, "SPLIT_FROM", 1)
    monkeypatch.setattr(native, "op", lambda: None)  # torch's fused kernel, not lminf's C++ one
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        decodes_as_the_reference("llama", "lminf", 13, "flash_cpu")
        decodes_as_the_reference("qwen2", "sinks", 1, "flash_cpu")
    finally:
        torch.set_num_threads(before)


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
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    else:  # the 4-bit kernel rounds its inputs to bfloat16, so float32 noise grows to bfloat16 noise
        assert float((got - want).norm() / want.norm()) < 2e-2
        # which flips near-ties (an Intel Xeon here: 2 of 80 steps, the forward's top two 0.005 and 0.016
        # apart): the fast step's choice is the forward's best or within 0.05 of it, and rarely not the best
        chosen = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
        behind = want.amax(-1) - chosen
        assert float(behind.max()) < 0.05 and int((behind > 0).sum()) <= 4


@pytest.fixture
def fast_calls(monkeypatch) -> list:
    """Counts the fast step's calls (so a test can tell which path decoded)."""
    calls, call = [], FastStep.__call__
    monkeypatch.setattr(FastStep, "__call__", lambda self, token: calls.append(1) or call(self, token))
    return calls


GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, prefill_chunk=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["lminf", "sinks"])
def test_generate_decodes_through_the_fast_step(family, strategy, fast_calls):
    model = lminf.patch(tiny_model(family), strategy, n_global=3, n_local=8)
    model.generation_config.eos_token_id = None  # 30 tokens whatever the random model writes
    ids = tokens(20, seed=4)
    out = model.generate(ids, max_new_tokens=30, **GREEDY)  # the ring of 8 wraps while decoding
    assert len(fast_calls) == 30  # every decoding call: the prompt's last token, then 29 generated ones
    reference = lminf.patch(tiny_model(family), strategy, n_global=3, n_local=8, backend=reference_attention)
    want = reference(out.sequences).logits[0, 19:-1]  # teacher-forced over the generated text, dense float64
    torch.testing.assert_close(torch.stack(out.scores)[:, 0], want, **FP32)
    plain = model.generate(ids, max_new_tokens=30, decode_step="forward", **GREEDY)
    assert len(fast_calls) == 30 and torch.equal(plain.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(plain.scores), torch.stack(out.scores), **FP32)


def test_generate_falls_back_to_the_forward_and_says_why(fast_calls):
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8)
    two = torch.cat([tokens(12, seed=5), tokens(12, seed=6)])
    out = model.generate(two, max_new_tokens=5, **GREEDY)  # auto: the forward
    assert not fast_calls and out.sequences.shape == (2, 17)
    with pytest.raises(ValueError, match="cannot run here: the fast step decodes one row"):
        model.generate(two, max_new_tokens=5, decode_step="fast", **GREEDY)
    masked = torch.tensor([[1] * 5 + [0] + [1] * 6])  # a hole, not left padding (the cache keeps no room)
    with pytest.raises(ValueError, match="cannot run here: the attention mask hides tokens"):
        model.generate(tokens(12), attention_mask=masked, max_new_tokens=5, decode_step="fast", **GREEDY)
    with pytest.raises(ValueError, match="decode_step must be one of"):
        model.generate(tokens(12), max_new_tokens=5, decode_step="fastest")
    top_k = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8, top_k=2, top_k_from_layer=0)
    with pytest.raises(ValueError, match="cannot run here: strategy 'lminf' keeps the middle tokens"):
        top_k.generate(tokens(12), max_new_tokens=5, decode_step="fast", **GREEDY)
    hidden = model.generate(tokens(12), max_new_tokens=5, output_hidden_states=True, **GREEDY)
    assert len(hidden.hidden_states) == 5  # a call that asks for more than logits gets the forward
    assert not fast_calls
    model.generate(tokens(12), max_new_tokens=5, decode_step="fast", **GREEDY)
    assert len(fast_calls) == 5
    assert not model._lminf.fast_steps  # nothing left registered once generate returns


def test_chat_turns_decode_through_the_fast_step(fast_calls):
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=2, n_local=8)
    session = Session(model, n_global=6)  # a pinned 6-token prefix (a chat's system prompt)
    turns, replies = [list(range(10, 25)), list(range(30, 37)), list(range(40, 52))], []
    for turn in turns:
        replies.append([t for t in stream_tokens(model, session, turn, Sampling(max_new_tokens=5), set()) if t is not None])
    assert len(fast_calls) == 3 * 4  # each sampled token but a turn's last (fed with the next prompt)
    reference = lminf.patch(tiny_model("llama"), "lminf", n_global=2, n_local=8, backend=reference_attention)
    greedy = reference(torch.tensor([session.tokens[:-1]]), lminf_n_global=6).logits[0].argmax(-1).tolist()
    position = 0
    for turn, reply in zip(turns, replies, strict=True):
        position += len(turn)
        assert reply == greedy[position - 1 : position - 1 + len(reply)]
        position += len(reply)
