"""Linear weights stored input-major for CPU decoding (lminf.weights.linear_layout): the
storage changes, the function does not. Reference: the same model as built, row-major."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lminf.generation import cache_kwarg
from lminf.weights.linear_layout import arrange_linear_weights, is_input_major
from tests.helpers import tiny_model

torch.set_grad_enabled(False)


def logits_and_step(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a full forward of ids[:, :-1], then of one decoding step on ids[:, -1:]."""
    cache = transformers.DynamicCache(config=model.config)
    full = model(ids[:, :-1], **cache_kwarg(model, cache), use_cache=True).logits
    step = model(ids[:, -1:], **cache_kwarg(model, cache), use_cache=True).logits
    return full, step


def test_arranged_model_computes_the_same(family):
    model = tiny_model(family)
    arranged = copy.deepcopy(model)
    assert arrange_linear_weights(arranged) > 0
    for (name, a), (_, b) in zip(model.named_modules(), arranged.named_modules(), strict=True):
        if isinstance(a, torch.nn.Linear):
            assert torch.equal(a.weight, b.weight), name  # the same values
            assert is_input_major(b.weight) == (a.out_features >= a.in_features), name
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    for got, want in zip(logits_and_step(arranged, ids), logits_and_step(model, ids), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_weights_stay_tied_and_save_as_loaded(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    arrange_linear_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_input_major(model.lm_head.weight)
    assert arrange_linear_weights(model, input_major=False) == 0  # what saving needs
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_contiguous()
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.arange(3, 20)[None]
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_get_row_major_weights_back(dtype):
    model = tiny_model("llama")
    arrange_linear_weights(model)
    model.to(dtype)  # .to keeps the strides, as a move to a GPU would
    assert any(not m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert arrange_linear_weights(model) == 0
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
