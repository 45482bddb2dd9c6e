"""lminf's C++ kernel for one query's attention (lminf.kernels.native, one_query_cpu.cpp) against
the dense float64 formula: any key heads, rows, head size and number of keys, keys stored in
float32, float64 or 16 bits, strided views of a larger cache, any number of threads; its errors;
and that it is off where it cannot be built."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lminf.kernels import native
from tests.conftest import HAS_CXX

torch.set_grad_enabled(False)
pytestmark = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler to build the kernel")


@pytest.fixture(scope="module")
def op():
    built = native.op()
    if built is None:
        pytest.fail(f"a C++ compiler is here but the kernel did not build: {native.why_not()}")
    return built


def dense(rows, keys, values, scale):
    """softmax(rows . keys * scale) . values in float64; rows (Hkv, rep, D), keys and values (Hkv, S, D)."""
    s = rows.double() @ keys.double().transpose(-1, -2) * scale
    return torch.softmax(s, -1) @ values.double()


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
    # decode_layer_cpu.cpp's enter and leave against lminf.kernels.decode_layers' (eager: the modules'
    # formulas), those run in float64 on the same numbers.
    from lminf.kernels import decode_layers

    g = torch.Generator().manual_seed(head_dim + bias)
    hidden, n_q, n_kv, inner = 3 * head_dim, 6, 2, 5 * head_dim

    def linear(n_out, n_in):
        return torch.randn(n_out, n_in, generator=g) / n_in**0.5, torch.randn(n_out, generator=g) if bias else None

    q, k, v = linear(n_q * head_dim, hidden), linear(n_kv * head_dim, hidden), linear(n_kv * head_dim, hidden)
    o, gate, up, down = linear(hidden, n_q * head_dim), linear(inner, hidden), linear(inner, hidden), linear(hidden, inner)
    norm1, norm2 = 1 + 0.1 * torch.randn(hidden, generator=g), 1 + 0.1 * torch.randn(hidden, generator=g)
    angle = torch.rand(head_dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([-angle.sin(), angle.sin()])
    x, attended = torch.randn(1, 1, hidden, generator=g), torch.randn(1, n_q, head_dim, generator=g)

    def wide(layer):
        return tuple(None if t is None else t.double() for t in layer)

    got = native.layers().enter(x, norm1, 1e-5, *q, *k, *v, cos[None, None], sin[None, None], head_dim)
    qkv, n_qk = (wide(q), wide(k), wide(v)), (n_q + n_kv) * head_dim
    want = decode_layers.enter(x.double(), cos.double(), sin.double(), norm1.double(), qkv, 1e-5, n_q, n_qk, head_dim)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    got = native.layers().leave(x, attended, *o, norm2, 1e-5, *gate, *up, *down)
    want = decode_layers.leave(x.double(), attended.double(), wide(o), norm2.double(), (wide(gate), wide(up)), wide(down), 1e-5)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
