"""patch / unpatch / generate on tiny random models, and the distance rules checked against the
vanilla model itself (independent of lminf's rotation code). What every strategy promises is in
tests/test_strategies.py."""

from __future__ import annotations

import pytest
import torch

import lminf
from tests.helpers import FP32, TINY_CONFIGS, tiny_model, tokens

torch.set_grad_enabled(False)


def test_generate_uses_bounded_cache_and_matches_full_forward():
    model = lminf.patch(tiny_model("qwen3"), n_global=2, n_local=8)
    ids = tokens(20)
    out = model.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out.past_key_values, lminf.LambdaCache)
    assert out.past_key_values.layers[0].keys.shape[-2] <= 2 + 8
    # teacher-forced full forward over the generated text gives the same greedy choices
    full = model(out.sequences, use_cache=False).logits[0, 19:-1]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0], full, **FP32)
    # the prompt through the cache in chunks first
    chunked = model.generate(
        ids, max_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True, prefill_chunk=4
    )
    torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(out.scores), **FP32)


def test_sampling_generate_runs_and_is_seeded():
    model = lminf.patch(tiny_model("mistral"), n_global=2, n_local=8)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(tokens(12), max_new_tokens=20, do_sample=True, top_p=0.9, temperature=0.8))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == 32


def test_unpatch_restores_vanilla():
    model = tiny_model("llama")
    ids = tokens(50)
    vanilla = model(ids).logits
    lminf.patch(model, n_local=8)
    assert not torch.allclose(model(ids).logits, vanilla, **FP32)
    lminf.unpatch(model)
    torch.testing.assert_close(model(ids).logits, vanilla, **FP32)
    assert "generate" not in vars(model) and "forward" not in vars(model)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 10000.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}


ROTARY = [f for f in TINY_CONFIGS if f != "mpt"]  # MPT's ALiBi: test_alibi_reads_the_first_token_at_distance_n_local


@pytest.mark.parametrize("family, rope", [("llama", r) for r in ROPES] + [(f, "default") for f in ROTARY] + [("qwen3", "yarn")])
def test_distance_cap_equals_vanilla_with_global_tokens_moved(family, rope):
    """Independent of lminf's rotation code: in a one-layer model, the last query's Lambda output
    equals the vanilla model's on a shortened input where the global tokens sit exactly n_local back."""
    config_class, extra = TINY_CONFIGS[family]
    own = getattr(config_class(**{**extra, "num_hidden_layers": 2}), "rope_parameters", None)  # None: GPT-J's own table
    rope_parameters = {**ROPES[rope], **{k: v for k, v in (own or {}).items() if k == "partial_rotary_factor"}}
    one_global_layer = dict(num_hidden_layers=1) | ({} if own is None else {"rope_parameters": rope_parameters})
    if "layer_types" in extra:
        one_global_layer["layer_types"] = ["full_attention"]
    if own and "full_attention" in own:  # rope parameters per layer type (Gemma 3)
        one_global_layer["rope_parameters"] = {"full_attention": {**own["full_attention"], **ROPES[rope]}}
    if "sliding_window" in extra:  # a layer that slides runs the model's own window, not the cap
        one_global_layer["sliding_window"] = None if "layer_types" not in extra else extra["sliding_window"]
    if "no_rope_layers" in extra:
        one_global_layer["no_rope_layers"] = [1]
    model = tiny_model(family, **one_global_layer)
    n_global, n_local, n = 3, 8, 30
    ids = tokens(n)
    last = n - 1
    short = torch.cat((ids[:, :n_global], ids[:, n - n_local :]), dim=1)
    positions = torch.tensor([[last - n_local] * n_global + list(range(n - n_local, n))])
    want = model(short, position_ids=positions).logits[0, -1]
    lminf.patch(model, n_global=n_global, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)


def test_alibi_reads_the_first_token_at_distance_n_local():
    """MPT's ALiBi bias depends on a key's distance from the last key, whatever the positions.
    With one global token the shortened input [first token | window] puts it exactly n_local back,
    so vanilla MPT on it is the capped rule, independently of lminf's bias code."""
    model = tiny_model("mpt", num_hidden_layers=1)
    n_local, n = 8, 30
    ids = tokens(n)
    want = model(torch.cat((ids[:, :1], ids[:, n - n_local :]), dim=1)).logits[0, -1]
    lminf.patch(model, n_global=1, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)
    lminf.unpatch(model)
    assert model.config._attn_implementation == "eager" and "forward" not in vars(model.transformer.blocks[0].attn)


def test_gptj_past_its_position_table():
    """GPT-J's sinusoid table stops at its training length (64 here); lminf grows it. At 100 tokens
    the last query equals a vanilla GPT-J with a longer table on the shortened input."""
    n_global, n_local, n = 3, 8, 100
    ids = tokens(n)
    longer = tiny_model("gptj", num_hidden_layers=1, max_position_embeddings=128)  # the same weights, a table of 128
    short = torch.cat((ids[:, :n_global], ids[:, n - n_local :]), dim=1)
    positions = torch.tensor([[n - 1 - n_local] * n_global + list(range(n - n_local, n))])
    want = longer(short, position_ids=positions).logits[0, -1]
    model = lminf.patch(tiny_model("gptj", num_hidden_layers=1), n_global=n_global, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)
    lminf.unpatch(model)
    assert not model.transformer.rotary_emb._forward_pre_hooks  # unpatch removes the growing hook


def test_a_position_free_layer_sees_the_first_tokens_and_the_window_unrotated():
    """SmolLM3's NoPE layers: the last query's output equals the vanilla model's on the
    shortened input [first tokens | window], whatever the positions (a NoPE logit has none)."""
    model = tiny_model("smollm3", num_hidden_layers=1, no_rope_layers=[0])
    n_global, n_local, n = 3, 8, 30
    ids = tokens(n)
    want = model(torch.cat((ids[:, :n_global], ids[:, n - n_local :]), dim=1)).logits[0, -1]
    lminf.patch(model, n_global=n_global, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)


def test_sinks_equal_vanilla_on_the_reindexed_cache():
    """Independent of lminf's rotation code: the last query of the sinks strategy equals the vanilla
    model on the shortened input laid out as StreamingLLM's re-indexed cache, [first n_global | last n_local]
    at positions 0 .. n_global + n_local - 1."""
    model = tiny_model("llama", num_hidden_layers=1)
    n_global, n_local, n = 3, 8, 30
    ids = tokens(n)
    short = torch.cat((ids[:, :n_global], ids[:, n - n_local :]), dim=1)
    want = model(short).logits[0, -1]
    lminf.patch(model, "sinks", n_global=n_global, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)


def test_a_strategy_by_instance_by_name_and_by_the_older_keyword_is_the_same():
    ids = tokens(40)
    by_instance = lminf.patch(tiny_model(), lminf.Sinks(n_global=2, n_local=8))(ids).logits
    by_name = lminf.patch(tiny_model(), "sinks", n_global=2, n_local=8)(ids).logits
    legacy = lminf.patch(tiny_model(), n_global=2, n_local=8, global_distance="reindexed")(ids).logits
    torch.testing.assert_close(by_name, by_instance, rtol=0, atol=0)
    torch.testing.assert_close(legacy, by_instance, rtol=0, atol=0)
    assert isinstance(lminf.settings_of(lminf.patch(tiny_model(), global_distance="capped")), lminf.LMInfinite)
