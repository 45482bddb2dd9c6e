"""Beam search through every strategy's cache (tests/strategy_cases.py)."""

import pytest
import torch

import lminf
from lminf.generation import cache_kwarg
from tests.helpers import FP32, tiny_model, tokens
from tests.strategy_cases import CASES

torch.set_grad_enabled(False)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("order", [[1, 0], [1, 1]])
def test_a_reordered_batch_continues_as_its_rows_alone(name, order):
    """Beam search reorders the cache's batch between steps (Cache.reorder_cache): each row then
    continues as the row it was copied from would alone; infllm refuses it, with the reason."""
    model = lminf.patch(tiny_model("llama"), CASES[name])
    prompts = torch.cat((tokens(30, seed=1), tokens(30, seed=2)))
    later = tokens(12, seed=3)
    cache = lminf.make_cache(model)
    model(prompts, **cache_kwarg(model, cache))
    for t in range(4):
        model(later[:, t : t + 1].expand(2, 1), **cache_kwarg(model, cache))
    if name == "infllm":
        with pytest.raises(NotImplementedError, match="beam search"):
            cache.reorder_cache(torch.tensor(order))
        return
    cache.reorder_cache(torch.tensor(order))
    alone = []  # each source row's cache, run alone to the same point
    for b, source in enumerate(order):
        alone.append(lminf.make_cache(model))
        model(prompts[source : source + 1], **cache_kwarg(model, alone[b]))
        for t in range(4):
            model(later[:, t : t + 1], **cache_kwarg(model, alone[b]))
        assert_rows_equal(cache, b, alone[b])  # every per-row tensor moved, used yet or not
    got = torch.cat([model(later[:, t : t + 1].expand(2, 1), **cache_kwarg(model, cache)).logits for t in range(4, 12)], 1)
    for b in range(2):
        want = torch.cat([model(later[:, t : t + 1], **cache_kwarg(model, alone[b])).logits for t in range(4, 12)], 1)
        torch.testing.assert_close(got[b : b + 1], want, **FP32)
        assert_rows_equal(cache, b, alone[b])


def assert_rows_equal(cache, b: int, alone) -> None:
    """Row b of every per-row tensor the cache and its layers hold (keys, scores, summaries, ...) equals `alone`'s."""
    for mine, its in [(cache, alone), *zip(cache.layers, alone.layers, strict=True)]:
        for field, kept in vars(mine).items():
            if isinstance(kept, torch.Tensor) and kept.dim() and kept.shape[0] == 2 and not field.endswith("_room"):
                torch.testing.assert_close(kept[b : b + 1], getattr(its, field), **FP32, msg=field)
