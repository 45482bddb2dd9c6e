"""Kernel "compiled": the decoding step's compiled attention (lminf.kernels.one_query) against
the dense float64 formula; the step with its compiled layers (lminf.kernels.decode_layers)
against the dense float64 reference model (float weights) and the model's forward (4-bit
weights); one graph per function for all layers; its fall-back where torch.compile cannot compile."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import lminf
from lminf import arguments
from lminf.eval.methods import make_method
from lminf.fast_decode import FastStep
from lminf.generation import cache_kwarg, decoder
from lminf.kernels import compiling, decode_layers
from lminf.kernels import one_query as kernel
from lminf.kernels.linear_layout import is_input_major
from tests.conftest import HAS_CXX
from tests.helpers import decoded, tiny_model, tokens
from tests.reference import dense_attention as dense
from tests.reference import reference_attention

torch.set_grad_enabled(False)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own graphs: past torch.compile's recompile limit (8 per function
    in one process) it would run the plain function instead, unseen."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


# Without a C++ compiler the kernel cannot run (the fall-back is tested below).
needs_compiler = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for torch.compile")


@pytest.fixture
def inductor_only(monkeypatch):
    """The attention as torch.compile generates it, not lminf's C++ kernel (tests/test_native.py)."""
    monkeypatch.setattr(kernel.native, "op", lambda: None)
    monkeypatch.setattr(kernel, "_native", None)


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def graphs(function) -> int:
    """How many graphs torch.compile holds for `function` (one per set of guards it met)."""
    return len(_debug_get_cache_entry_list(function.__code__))


def perturbed(model):
    """The model with random biases (Qwen2's q, k, v) and norm weights: initialised they are 0
    and 1, which would hide a graph that drops them."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.data += 0.1 * torch.randn(p.shape, generator=g)
    return model


@needs_compiler
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 3, 1), (1, 4, 37), (2, 1, 300)])  # (key heads, rows per head, keys)
def test_one_query_equals_the_dense_formula(stored, shape, inductor_only):
    hkv, rep, n = shape
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(1, hkv, rep, 16, generator=g)
    keys, values = (torch.randn(1, hkv, n, 16, generator=g).to(stored) for _ in range(2))
    want = dense(rows, keys, values, 0.25)
    for got in (kernel.one_query(rows, keys, values, 0.25), kernel.compiled_pass(rows, keys, values, 0.25)):
        assert got.dtype == torch.float32  # the query's dtype: keys stored in 16 bits are read, not rounded to
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert compiled_graphs() == 1


@pytest.mark.parametrize("n_keys, parts", [(1, 8), (37, 4), (64, 8), (300, 8), (20, 3)])  # parts that leave keys over, and none
def test_the_pass_in_parts_equals_the_dense_formula(n_keys, parts, inductor_only):
    g = torch.Generator().manual_seed(n_keys)
    rows = torch.randn(1, 2, 3, 16, generator=g)
    keys, values = (3 * torch.randn(1, 2, n_keys, 16, generator=g) for _ in range(2))  # spread scores: the maximum matters
    want = dense(rows, keys, values, 0.25)
    torch.testing.assert_close(kernel.one_query_in_parts(rows, keys, values, 0.25, parts).double(), want, rtol=1e-5, atol=1e-5)
    got = kernel.one_query_in_parts(rows.double(), keys.double(), values.double(), 0.25, parts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # in float64: the same sum, not an approximation


@needs_compiler
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_past_parts_above_the_compiled_pass_runs_in_parts(stored, inductor_only):
    n_keys = kernel.PARTS_ABOVE + 5
    assert kernel.parts_for(n_keys) == 8 and kernel.parts_for(8 * kernel.PARTS_ABOVE + 1) == 16
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(1, 3, 3, 64, generator=g)
    keys, values = (torch.randn(1, 3, n_keys, 64, generator=g).to(stored) for _ in range(2))
    got = kernel.compiled_pass(rows, keys, values, 0.125)
    torch.testing.assert_close(got.double(), dense(rows, keys, values, 0.125), rtol=1e-5, atol=1e-5)
    assert graphs(kernel.one_query_in_parts) == 1 and graphs(kernel.one_query) == 0


@needs_compiler
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("attention", ["inductor", "inductor in parts", "native"])
def test_compiled_decoding_equals_the_dense_reference(family, kv_dtype, attention, monkeypatch):
    # A one-token prompt: every later token decodes through the fast step, past the ring's wrap
    # and with far keys. Both models store the same (16-bit) keys in the same cache, one token
    # at a time; the query stays float32. The attention as torch.compile generates it (in parts:
    # 3 parts from 5 keys on), or lminf's C++ kernel (lminf.kernels.native) inside the graphs.
    in_parts = attention == "inductor in parts"
    if attention == "native":
        if not kernel.prepare():
            pytest.skip(f"lminf's C++ kernel cannot be built here: {kernel.native.why_not()}")
    else:
        monkeypatch.setattr(kernel.native, "op", lambda: None)
        monkeypatch.setattr(kernel, "_native", None)
    if in_parts:
        monkeypatch.setattr(kernel, "PARTS_ABOVE", 4)
        monkeypatch.setattr(kernel, "parts_for", lambda n_keys: 3)
    settings = dict(n_global=3, n_local=8, kv_dtype=kv_dtype)
    layers = 3  # two of them end in the same graph
    model = lminf.patch(perturbed(tiny_model(family, num_hidden_layers=layers)), "lminf", backend="compiled", **settings)
    cache = lminf.make_cache(model)
    step = decoder(model, cache)
    assert isinstance(step, FastStep) and (step.attention_kernel, step.layers_kernel) == ("compiled", "compiled")
    ids = tokens(40, seed=4)
    with torch.profiler.profile() as profiled:
        got = decoded(model, ids, 1, cache)
    ran_native = any(event.name == "lminf::one_query" for event in profiled.events())
    assert ran_native == (attention == "native")  # lminf's C++ kernel ran inside the graphs, or not at all
    plain = perturbed(tiny_model(family, num_hidden_layers=layers))
    reference = lminf.patch(plain, "lminf", backend=reference_attention, **settings)
    ref = decoded(reference, ids, 1, lminf.make_cache(reference))  # its own forward, one token at a time
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # The attention, each layer's two graphs and the head ran compiled, and the layers share
    # one graph each (one per layer would pass the recompile limit on a 30-layer model).
    # A layer's attention runs inside its graph with the layer's end and the next one's start; its
    # graphs are a few per function (the compiler specialises a single key, and the parts' remainders
    # 0 and 1), not one per layer or per number of keys.
    ran = decode_layers.attend_in_parts_leave_enter if in_parts else decode_layers.attend_leave_enter
    assert all(graphs(f) == 1 for f in (decode_layers.enter, decode_layers.leave_head))
    assert 1 <= graphs(ran) <= (5 if in_parts else 2), graphs(ran)


def test_where_it_cannot_compile_it_says_so_and_decodes_with_the_plain_kernels(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiling, "_graphs", {})  # nothing compiled yet in this process
    monkeypatch.setattr(compiling, "_failed", None)
    monkeypatch.setattr(torch, "compile", lambda function, **options: broken)
    model = lminf.patch(tiny_model("llama"), "lminf", n_global=3, n_local=8, backend="compiled")
    ids = tokens(20, seed=5)
    with pytest.warns(UserWarning, match="cannot compile here.*no C\\+\\+ compiler") as said:
        got = decoded(model, ids, 1)
    assert len(said) == 1 and not compiling.compiles()  # said once: later steps run the plain kernels
    step = decoder(model, lminf.make_cache(model))
    assert (step.attention_kernel, step.layers_kernel) == ("flash_cpu", "modules")
    ref = lminf.patch(tiny_model("llama"), "lminf", backend=reference_attention, n_global=3, n_local=8)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_command_line_takes_the_kernel(monkeypatch):
    parser = argparse.ArgumentParser()
    arguments.add_model_args(parser)
    args = parser.parse_args(["--kernel", "compiled"])
    monkeypatch.setattr(arguments, "load_model", lambda *given: (tiny_model("llama"), None))
    model, _ = arguments.load(args)
    assert model._lminf.kernel == "compiled"
    assert make_method("lminf", args).settings()["kernel"] == "compiled"  # the eval commands' methods too
    assert "kernel" not in make_method("lminf", parser.parse_args([])).settings()


def test_the_compiled_kernel_stores_the_weights_as_its_layers_read_them():
    # Its layers read row-major weights fastest (lminf.kernels.decode_layers); the values stay.
    model = tiny_model("llama")
    want = {name: p.clone() for name, p in model.named_parameters()}
    assert lminf.arrange_linear_weights(model) > 0  # some stored input-major, as loaded models are
    lminf.patch(model, "lminf", backend="compiled")
    assert not any(is_input_major(p) for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name])


def four_bit(model):
    """The model with every decoder and output linear layer as 4-bit Int4Linear (its weights
    quantized to Q4_1 blocks), so they run on the int4 kernel as `--weights gguf` does."""
    from gguf import GGMLQuantizationType, quants

    from lminf.gguf_weights import GROUP, block_parts
    from lminf.kernels.int4 import Int4Linear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                raw = quants.quantize(child.weight.detach().numpy(), GGMLQuantizationType.Q4_1)
                parts = block_parts(raw, GGMLQuantizationType.Q4_1)
                setattr(parent, name, Int4Linear(parts, GROUP, None if child.bias is None else child.bias.detach().clone()))
    return model


@needs_compiler
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_four_bit_layers_equal_the_forward(family):
    # Wide enough that q, k, v (and gate, up) join at the int4 kernel's tile edge, as the default model's do.
    sizes = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = lminf.patch(four_bit(perturbed(tiny_model(family, **sizes))), "lminf", backend="compiled", n_global=3, n_local=8)
    ids = tokens(30, seed=6)
    cache = lminf.make_cache(model)
    assert decoder(model, cache).layers_kernel == "compiled"
    got = decoded(model, ids, 1, cache)
    # The model's own forward, one token at a time: the same 4-bit kernel on the same inputs
    # (the graphs compute the norms as the modules do, so the bfloat16 rounding of the kernel's
    # inputs falls the same way).
    plain = lminf.make_cache(model)
    want = torch.cat([model(ids[:, t : t + 1], **cache_kwarg(model, plain)).logits[:, -1:] for t in range(ids.shape[1])], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(graphs(f) == 1 for f in (decode_layers.enter, decode_layers.leave_head))
    assert 1 <= graphs(decode_layers.attend_leave_enter) <= 2  # a single key and every later number
