"""The documented way to time or reuse a prompt: `lminf.prefill` all but its last token into the
strategy's cache, then `generate` with the whole prompt and that cache. It must give plain
`generate`'s tokens and leave the cache holding each token once."""

from __future__ import annotations

import pytest
import torch

import lminf
from lminf.generation import cache_kwarg
from tests.helpers import tiny_model
from tests.strategy_cases import CASES

PROMPT, NEW, CHUNK = 40, 20, 16


def _patched(case: str) -> torch.nn.Module:
    return lminf.patch(tiny_model("llama"), CASES[case])


def _prompt() -> torch.Tensor:
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [CHUNK, PROMPT])
def test_prefill_then_generate_equals_generate(case, chunk):
    model, ids = _patched(case), _prompt()
    if chunk != CHUNK and not model._lminf.strategy.same_across_calls:
        pytest.skip("its output depends on how the prompt is split into calls: compared at the same split only")
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False, prefill_chunk=CHUNK)
    cache = lminf.make_cache(model)
    one_turn = model._lminf.strategy.needs_scores  # its cache counts turns (SirLLM): the two calls make one
    if one_turn:
        lminf.begin_turn(cache, PROMPT + NEW)
    lminf.prefill(model, ids[:, :-1], cache, chunk_size=chunk, turn=not one_turn)
    assert cache.get_seq_length() == PROMPT - 1
    out = model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=NEW, do_sample=False, turn=not one_turn)
    assert out.tolist() == plain.tolist()
    # every token once: the prompt and all generated tokens but the last, which no call has fed yet
    assert cache.get_seq_length() == out.shape[1] - 1  # (an end-of-text token may stop it early)


def test_a_cache_holding_the_whole_prompt_is_refused():
    model, ids = _patched("lminf"), _prompt()
    cache = lminf.make_cache(model)
    lminf.prefill(model, ids, cache)
    with pytest.raises(ValueError, match=r"prefill all but it \(lminf.prefill\(model, ids\[:, :-1\], cache\)\)"):
        model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    assert cache.get_seq_length() == PROMPT  # nothing fed twice
