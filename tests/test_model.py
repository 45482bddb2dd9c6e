"""Lambda attention inside real transformers models: tiny random configs of each family."""

from __future__ import annotations

import pytest
import torch

import lminf
from tests.conftest import tiny_model
from tests.reference import reference_attention

torch.set_grad_enabled(False)
FP32 = dict(rtol=1e-4, atol=1e-4)


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_patched_equals_vanilla_within_window(family):
    model = tiny_model(family)
    ids = tokens(60)  # <= n_local = max_position_embeddings = 64
    vanilla = model(ids).logits
    lminf.patch(model)
    torch.testing.assert_close(model(ids).logits, vanilla, **FP32)


VARIANTS = {"lminf": {}, "lminf-top2": {"top_k": 2}, "sinks": {"global_distance": "reindexed"}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_equals_reference_in_model(family, variant):
    ids = tokens(45, batch=2)  # several windows past n_local
    settings = dict(n_global=3, n_local=8, top_k_from_layer=1, **VARIANTS[variant])
    fast = lminf.patch(tiny_model(family), **settings)(ids).logits
    ref = lminf.patch(tiny_model(family), backend=reference_attention, **settings)(ids).logits
    torch.testing.assert_close(fast, ref, **FP32)


@pytest.mark.parametrize("prompt", [13, 1])  # longer than the window; one token, then decoding fills the cache
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_one_full_forward(family, variant, prompt):
    model = lminf.patch(tiny_model(family), n_global=3, n_local=8, top_k_from_layer=1, **VARIANTS[variant])
    ids = tokens(50)
    full = model(ids, use_cache=False).logits

    cache = lminf.make_cache(model)
    steps = [model(ids[:, :prompt], past_key_values=cache).logits]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(prompt, 30)]  # token by token
    steps += [model(ids[:, 30:41], past_key_values=cache).logits, model(ids[:, 41:], past_key_values=cache).logits]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32)
    assert cache.get_seq_length() == 50


def test_cache_memory_stays_bounded():
    n_global, n_local = 4, 16
    model = lminf.patch(tiny_model("llama"), n_global=n_global, n_local=n_local)
    cache = lminf.make_cache(model)
    ids = tokens(2000)
    model(ids[:, :100], past_key_values=cache)
    for t in range(100, 2000):
        model(ids[:, t : t + 1], past_key_values=cache)
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # K and V, fp32
    assert cache.get_seq_length() == 2000
    assert all(layer.keys.shape[-2] <= n_global + n_local for layer in cache.layers)
    assert cache.memory_bytes() <= (n_global + n_local) * per_token


def test_left_padded_batch_equals_rows_alone():
    model = lminf.patch(tiny_model("llama"), n_global=3, n_local=8)
    rows = [tokens(30, seed=1)[0], tokens(19, seed=2)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1

    batched = model(ids, attention_mask=mask).logits
    for b, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        torch.testing.assert_close(batched[b, width - len(r) :], alone, **FP32)

    # generate() with its default (bounded) cache, past the window, greedy
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    # the prompt fed through the cache in chunks first (generate's prefill) changes nothing
    chunked = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        prefill_chunk=3,
    )
    torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(out.scores), **FP32)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences[b, width:], alone.sequences[0, len(r) :])
        torch.testing.assert_close(torch.stack(out.scores)[:, b], torch.stack(alone.scores)[:, 0], **FP32)


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
    assert "generate" not in vars(model)


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


@pytest.mark.parametrize(
    "family, rope", [("llama", r) for r in ROPES] + [("phi3", "default"), ("gemma", "default"), ("qwen3", "yarn")]
)
def test_distance_cap_equals_vanilla_with_global_tokens_moved(family, rope):
    """Independent of lminf's rotation code: in a one-layer model, the last query's Lambda output
    equals the vanilla model's on a shortened input where the global tokens sit exactly n_local back."""
    rope_parameters = dict(ROPES[rope])
    if family == "phi3":
        rope_parameters["partial_rotary_factor"] = 0.5
    model = tiny_model(family, num_hidden_layers=1, rope_parameters=rope_parameters)
    n_global, n_local, n = 3, 8, 30
    ids = tokens(n)
    last = n - 1
    short = torch.cat((ids[:, :n_global], ids[:, n - n_local :]), dim=1)
    positions = torch.tensor([[last - n_local] * n_global + list(range(n - n_local, n))])
    want = model(short, position_ids=positions).logits[0, -1]
    lminf.patch(model, n_global=n_global, n_local=n_local)
    torch.testing.assert_close(model(ids).logits[0, -1], want, **FP32)
