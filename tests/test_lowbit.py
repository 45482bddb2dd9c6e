"""Low-bit options: a GGUF file's own 4/8-bit weights (lminf.weights.gguf, lminf.weights.int4)
and a 16-bit cache (`kv_dtype`).

References: the gguf package's own de-quantizer for what the blocks mean, float64 matmuls for
the kernel, and the default model's converted float32 weights (transformers' conversion of the
same file) for which file tensor and which rows each layer gets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lminf
from lminf.eval.bench import prefill_flops, weight_bytes
from lminf.eval.methods import Patched
from lminf.generation import cache_kwarg
from lminf.weights.gguf import BLOCK_BYTES, GROUP, block_parts
from lminf.weights.int4 import Int4Linear
from tests.helpers import tiny_model
from tests.reference import reference_attention
from tests.strategy_cases import random_case

torch.set_grad_enabled(False)
BF16_REL = 1e-2  # the kernel rounds its inputs, scales and output to bfloat16 (8 significant bits)


def dense_of(parts) -> torch.Tensor:
    """float64 weight of Int4Linear parts: sum of (code - 8) * scale + zero, per group of 32."""
    expand = lambda t: t.double().repeat_interleave(GROUP, dim=1)  # noqa: E731
    return sum((codes.double() - 8) * expand(scale) + expand(zero) for codes, scale, zero in parts)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", sorted(BLOCK_BYTES, key=lambda k: k.name), ids=lambda k: k.name)
def test_blocks_mean_what_gguf_says(kind):
    weights = np.random.default_rng(0).standard_normal((48, 4 * GROUP)).astype(np.float32)
    raw = quants.quantize(weights, kind)
    expected = torch.from_numpy(quants.dequantize(raw, kind)).double()
    parts = block_parts(raw, kind)
    assert all(int(codes.min()) >= 0 and int(codes.max()) <= 15 for codes, _, _ in parts)
    torch.testing.assert_close(dense_of(parts), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0], ids=lambda k: k.name)
def test_int4_linear_equals_its_weight(kind):
    rng = np.random.default_rng(1)
    raw = quants.quantize(rng.standard_normal((64, 6 * GROUP)).astype(np.float32), kind)
    parts = block_parts(raw, kind)
    bias = torch.randn(64)
    layer = Int4Linear(parts, GROUP, bias)
    x = torch.randn(2, 5, 6 * GROUP)
    y = layer(x)
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32
    assert relative(y, x.double() @ dense_of(parts).T + bias.double()) < BF16_REL


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0], ids=lambda k: k.name)
def test_int4_layers_side_by_side_share_their_codes(kind):
    rng = np.random.default_rng(2)
    shapes = (128, 64, 48)  # q, k and v of a grouped-query layer (all but the last join at the kernel's tile edge)
    parts = [block_parts(quants.quantize(rng.standard_normal((n, 4 * GROUP)).astype(np.float32), kind), kind) for n in shapes]
    layers = [Int4Linear(p, GROUP, torch.randn(n)) for p, n in zip(parts, shapes, strict=True)]
    x = torch.randn(1, 1, 4 * GROUP)
    alone = [layer(x) for layer in layers]
    fused = Int4Linear.side_by_side(layers)
    torch.testing.assert_close(fused(x), torch.cat(alone, -1), rtol=0, atol=0)  # the same kernel on the same rows
    want = torch.cat([x.double() @ dense_of(p).T + layer.bias.double() for p, layer in zip(parts, layers, strict=True)], -1)
    assert relative(fused(x), want) < BF16_REL
    for layer, before in zip(layers, alone, strict=True):  # each layer now reads rows of the fused codes
        assert layer.packed0.untyped_storage().data_ptr() == fused.packed0.untyped_storage().data_ptr()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="side by side need"):
        Int4Linear.side_by_side([layers[0], Int4Linear(parts[1], GROUP)])  # one with a bias, one without
    with pytest.raises(ValueError, match="side by side need"):
        Int4Linear.side_by_side([layers[2], layers[0]])  # 48 rows end inside a tile: the next would not line up


def test_int4_linear_checks_its_parts():
    codes = torch.zeros(8, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not match"):
        Int4Linear([(codes, torch.ones(8, 3), torch.zeros(8, 3))], GROUP)


def test_gguf_weights_need_a_built_in_float32_model(tmp_path):
    with pytest.raises(ValueError, match="built-in"):
        lminf.load_model(str(tmp_path), weights="gguf")
    with pytest.raises(ValueError, match="weights must be one of"):
        lminf.load_model(None, weights="int3")


@pytest.mark.slow  # loads the default model twice
def test_default_model_runs_its_own_blocks():
    dense, tokenizer = lminf.load_default()
    low, _ = lminf.load_default(weights="gguf")
    linears = {name: m for name, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    swapped = {name: m for name, m in low.named_modules() if isinstance(m, Int4Linear)}
    assert set(swapped) == set(linears)  # every layer linear (Q4_1) and the tied output layer (Q8_0)
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.7.self_attn.k_proj",
        "model.layers.29.mlp.down_proj",
        "lm_head",
    ):
        x = torch.randn(3, linears[name].in_features)
        # The converted model holds transformers' reading of the same blocks (q and k rows reordered).
        assert relative(swapped[name](x), x.double() @ linears[name].weight.double().T) < BF16_REL, name
    assert weight_bytes(low) < 0.2 * weight_bytes(dense)  # what a decoding step reads
    method = Patched(lminf.LMInfinite(n_local=64))
    assert prefill_flops(low, 128, method) == prefill_flops(dense, 128, method)  # the same work, fewer bytes
    ids = tokenizer(open(__import__("_pydecimal").__file__).read()[:4000], return_tensors="pt").input_ids[:, :512]
    nll = [torch.nn.functional.cross_entropy(m(ids).logits[0, :-1], ids[0, 1:]) for m in (dense, low)]
    assert abs(float(nll[1] / nll[0]) - 1) < 0.01
    lminf.patch(low, n_local=64)  # and it runs under a strategy, through the cache
    out = low.generate(ids[:, :200], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 203)


# -- a 16-bit cache (kv_dtype) ------------------------------------------------------------

BF16_ATTENTION = dict(rtol=3e-2, atol=3e-2)  # q, k, v and the softmax weights rounded to bfloat16; sums in float32


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_attention_reads_16bit_keys(data):
    strategy, q, k, v, layout, call, real_queries = random_case(data)
    assume(not strategy.stateful)  # InfLLM keeps its own cache: kv_dtype is refused there
    # Top-k choices are made on rounded scores: a near tie may pick another key than the exact
    # scores would (a 16-bit cache's documented cost), so the property holds without top-k.
    assume(not getattr(strategy, "top_k", 0))
    k, v = k.float().bfloat16(), v.float().bfloat16()
    got = strategy.attention(q.float(), k, v, layout, call)
    want = reference_attention(strategy, q.bfloat16(), k, v, layout, call)  # float64 from the rounded inputs
    mask = real_queries[:, None, :, None].expand_as(got)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[mask], want[mask].float(), **BF16_ATTENTION)


def test_a_16bit_cache_halves_memory_and_decodes_as_one_forward():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for kv_dtype in (None, torch.bfloat16):
        lminf.patch(model, n_global=2, n_local=8, kv_dtype=kv_dtype)
        whole = lminf.make_cache(model)
        logits = model(ids, use_cache=True, **cache_kwarg(model, whole)).logits
        stepwise = lminf.make_cache(model)
        model(ids[:, :30], use_cache=True, **cache_kwarg(model, stepwise))
        steps = [model(ids[:, t : t + 1], use_cache=True, **cache_kwarg(model, stepwise)).logits for t in range(30, 40)]
        # In 16 bits the two paths round their softmax weights differently: equal to bfloat16 noise.
        tolerance = 1e-4 if kv_dtype is None else 3e-3
        torch.testing.assert_close(torch.cat(steps, 1), logits[:, 30:], rtol=tolerance, atol=tolerance)
        assert {layer.keys.dtype for layer in whole.layers} == {kv_dtype or torch.float32}
        out[kv_dtype] = (logits, whole.memory_bytes())
        lminf.unpatch(model)
    assert out[torch.bfloat16][1] * 2 == out[None][1]
    torch.testing.assert_close(out[torch.bfloat16][0], out[None][0], **BF16_ATTENTION)


def test_kv_dtype_is_refused_where_the_cache_is_the_strategy_s_own():
    with pytest.raises(ValueError, match="kv_dtype is not supported by strategy 'infllm'"):
        lminf.patch(tiny_model("llama"), "infllm", n_local=8, kv_dtype=torch.bfloat16)
