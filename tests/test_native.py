"""lminf's C++ kernel for one query's attention (lminf.decoding.native, one_query_cpu.cpp) against
the dense float64 formula: any key heads, rows, head size and number of keys, keys stored in
float32, float64 or 16 bits, strided views of a larger cache, any number of threads; its errors;
that it is off where it cannot be built; and its layers around the attention (decode_layer_cpu.cpp)
against the layer's formulas (Llama's, written out below), float32 weights in float64 and 4-bit weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lminf.decoding import native
from lminf.decoding.modules import joined
from lminf.decoding.native_stack import products
from lminf.rope import rotate
from lminf.weights.int4 import Int4Weights, int4_linear
from tests.conftest import HAS_CXX
from tests.reference import dense_attention as dense

torch.set_grad_enabled(False)
pytestmark = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler to build the kernel")


@pytest.fixture(scope="module")
def op():
    built = native.op()
    if built is None:
        pytest.fail(f"a C++ compiler is here but the kernel did not build: {native.why_not()}")
    return built


@settings(max_examples=80, deadline=None)
@given(
    hkv=st.integers(1, 4),
    rep=st.integers(1, 5),
    head_dim=st.sampled_from([8, 16, 40, 64, 80, 128]),  # the usual sizes run unrolled; others and ones below a vector too
    n_keys=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    spread=st.sampled_from([0.1, 1.0, 8.0]),  # near-uniform to one-hot attention: the running maximum matters
    room=st.integers(0, 7),  # the keys a slice of a longer cache, as a decoding step reads them
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_equals_the_dense_formula(op, hkv, rep, head_dim, n_keys, dtype, spread, room, threads, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(hkv, rep, head_dim, generator=g)
    store = [(spread * torch.randn(1, hkv, n_keys + room, head_dim, generator=g)).to(dtype) for _ in range(2)]
    keys, values = (s[0, :, room:] for s in store)  # strided: each head's keys sit in a longer buffer
    scale = head_dim**-0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = op(rows, keys, values, scale)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    # The keys as stored (16 bits read, not rounded again); the sums in float32, whose rounding
    # grows with the values' and the scores' size (spread).
    torch.testing.assert_close(got.double(), dense(rows, keys, values, scale), rtol=2e-5, atol=3e-5 * spread)


@settings(max_examples=40, deadline=None)
@given(
    n_keys=st.integers(1, 200),
    n_far=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_turns_the_first_keys_as_asked(op, n_keys, n_far, dtype, threads, seed):
    # Past the window the first tokens' keys are read turned to where the query sees them
    # (lminf.decoding): the kernel turns the first n_far as lminf.rope.rotate would, rounded to
    # the cache's dtype as a turned key stored there is.
    from lminf.rope import rotate, rotation

    g = torch.Generator().manual_seed(seed)
    n_far = min(n_far, n_keys)
    rows = torch.randn(3, 3, 64, generator=g)
    keys, values = (torch.randn(3, n_keys, 64, generator=g).to(dtype) for _ in range(2))
    delta = torch.randint(-5000, 5000, (1, n_far), generator=g)
    cos, sin = rotation(delta, 1e5 ** -(torch.arange(0, 64, 2) / 64))  # (1, 1, n_far, 64)
    turned = keys.clone()
    turned[:, :n_far] = rotate(keys[None, :, :n_far], (cos, sin))[0]  # rounded to dtype as stored
    stored, before = keys.clone(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = op(rows, keys, values, 0.125, cos[0, 0], sin[0, 0])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), dense(rows, turned, values, 0.125), rtol=2e-5, atol=3e-5)
    assert torch.equal(keys, stored)  # the keys as stored are left alone


@pytest.mark.parametrize("n_keys", [4097, 8195])
def test_past_4096_keys_the_threads_cut_more_parts(op, n_keys):
    # Past 4,096 keys each thread takes 4 parts (a different path through the merge).
    g = torch.Generator().manual_seed(n_keys)
    rows = torch.randn(3, 3, 64, generator=g)
    keys, values = (3 * torch.randn(3, n_keys, 64, generator=g).bfloat16() for _ in range(2))
    torch.testing.assert_close(op(rows, keys, values, 0.125).double(), dense(rows, keys, values, 0.125), rtol=2e-5, atol=2e-5)


def test_it_refuses_what_it_cannot_compute(op):
    rows, keys = torch.randn(2, 3, 16), torch.randn(2, 10, 16)
    with pytest.raises(RuntimeError, match="rows are float32"):
        op(rows.double(), keys, keys, 0.25)
    with pytest.raises(RuntimeError, match="rows \\(Hkv, rep, D\\)"):
        op(rows, keys[:1], keys[:1], 0.25)
    with pytest.raises(RuntimeError, match="at least one key"):
        op(rows, keys[:, :0], keys[:, :0], 0.25)
    with pytest.raises(RuntimeError, match="D contiguous"):
        op(rows, keys.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :16], keys, 0.25)


def test_it_is_off_where_asked_and_says_why_where_it_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setitem(native._state, "why", None)
    monkeypatch.delitem(native._state, "op", raising=False)
    monkeypatch.setenv("LMINF_NATIVE", "0")
    assert native.op() is None and native.why_not() == "LMINF_NATIVE=0"
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="compiling one_query_cpu.cpp and decode_layer_cpu.cpp failed"):
        native._built()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left where the next run would load it


@pytest.mark.parametrize("bias", [False, True])  # Qwen2's q, k, v projections have biases; Llama's none
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_layer_equals_its_formulas_in_float64(op, bias, head_dim):
    # decode_layer_cpu.cpp's enter and leave against the modules' formulas (below), run in float64
    # on the same numbers.
    g = torch.Generator().manual_seed(head_dim + bias)
    shapes = layer_shapes(head_dim)
    linears = [torch.nn.Linear(n_in, n_out, bias=bias) for n_out, n_in in shapes["products"]]
    for linear in linears:
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / linear.in_features**0.5)
        if bias:
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=g))
    wide = [(m.weight.double(), None if m.bias is None else m.bias.double()) for m in linears]
    got, want = both_ways(linears, wide, shapes, g, torch.float64)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_the_layer_with_4_bit_weights_equals_its_formulas(op):
    # 4-bit products (lminf.weights.int4: the int4 kernel, its inputs rounded to bfloat16), q, k, v
    # joined into one layer as the fast step joins them; against the formulas calling the same
    # kernel, in float32: equal up to a bfloat16 rounding of an input that float32 sums in another
    # order put on the other side of it.
    from lminf.weights.gguf import GROUP
    from lminf.weights.int4 import Int4Linear

    g = torch.Generator().manual_seed(4)
    shapes = layer_shapes(64)

    def int4(n_out, n_in):
        scale = torch.rand(n_out, n_in // GROUP, generator=g) / n_in**0.5
        codes = torch.randint(0, 16, (n_out, n_in), generator=g)
        return Int4Linear([(codes, scale, -8 * scale)], GROUP, torch.randn(n_out, generator=g))

    linears = [int4(n_out, n_in) for n_out, n_in in shapes["products"]]
    layers = [*joined(linears[:3]), *linears[3:]]
    assert len(layers) == 5  # q, k and v as one
    got, want = both_ways(layers, [m.weights() for m in layers], shapes, g, torch.float32)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def layer_shapes(head_dim: int) -> dict:
    hidden, n_q, n_kv, inner = 3 * head_dim, 6, 2, 5 * head_dim
    products = [(n_q * head_dim, hidden), (n_kv * head_dim, hidden), (n_kv * head_dim, hidden), (hidden, n_q * head_dim)]
    products += [(inner, hidden), (inner, hidden), (hidden, inner)]  # q, k, v, o, gate, up, down: (out, in)
    return dict(hidden=hidden, n_q=n_q, n_kv=n_kv, head_dim=head_dim, products=products)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """F.linear over (weight, bias); 4-bit weights (Int4Weights) through their kernel."""
    return int4_linear(x, layer) if isinstance(layer, Int4Weights) else F.linear(x, *layer)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: computed in float32 (float64 stays), then the input's dtype."""
    h = x.float() if x.dtype != torch.float64 else x
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def enter(x, cos, sin, norm, qkv: tuple, eps: float, n_q: int, n_qk: int, head_dim: int):
    """Llama's layer up to its attention: x (1, 1, hidden) -> query (1, Hq, D), key and value (1, Hkv, 1, D)."""
    y = torch.cat([linear(rms_norm(x, norm, eps), layer) for layer in qkv], -1)
    qk = rotate(y[..., :n_qk].view(1, -1, head_dim), (cos, sin))
    return qk[:, :n_q], qk[:, n_q:, None], y[..., n_qk:].view(1, -1, 1, head_dim)


def leave(x, attended, o, norm, gate_up: tuple, down, eps: float):
    """Llama's layer after its attention: x and the attention's output (1, Hq, D) -> x after the layer."""
    x = x + linear(attended.reshape(1, 1, -1), o)
    gate, up = torch.cat([linear(rms_norm(x, norm, eps), layer) for layer in gate_up], -1).chunk(2, -1)
    return x + linear(F.silu(gate) * up, down)


def both_ways(linears, formulas, shapes, g, dtype):
    """(enter's 3 outputs and leave's, by the C++ layer), (the same by the formulas above in dtype);
    linears: the modules [q, k, v] (or one joined), o, gate, up, down; formulas: their (weight, bias) or Int4Weights."""
    hidden, n_q, n_kv, head_dim = shapes["hidden"], shapes["n_q"], shapes["n_kv"], shapes["head_dim"]
    n_qkv = len(linears) - 4
    norm1, norm2 = 1 + 0.1 * torch.randn(hidden, generator=g), 1 + 0.1 * torch.randn(hidden, generator=g)
    angle = torch.rand(head_dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    signed_sin = torch.cat([-angle.sin(), angle.sin()])  # what the C++ layer takes: rotate_half(x) * sin as roll(x) * signed_sin
    x, attended = torch.randn(1, 1, hidden, generator=g), torch.randn(1, n_q, head_dim, generator=g)
    ops = native.layers()
    got = [*ops.enter(x, norm1, 1e-5, *products(linears[:n_qkv]), cos[None, None], signed_sin[None, None], n_q, head_dim)]
    got.append(ops.leave(x, attended, norm2, 1e-5, *products(linears[n_qkv:])))
    c = dict(dtype=dtype)
    qkv, (o, gate, up, down) = tuple(formulas[:n_qkv]), formulas[n_qkv:]
    n_qk = (n_q + n_kv) * head_dim
    want = [*enter(x.to(**c), cos.to(**c), sin.to(**c), norm1.to(**c), qkv, 1e-5, n_q, n_qk, head_dim)]
    want.append(leave(x.to(**c), attended.to(**c), o, norm2.to(**c), (gate, up), down, 1e-5))
    return got, want
