"""Perplexity by position: per-token NLL of long texts under several methods, bucketed.

`run_ppl` scores every (document, method) cell in one pass each (lminf.eval.methods), and
`run_stream` feeds one long text through a method's bounded cache, recording NLL, speed and
memory per bucket and checkpointing the whole state (cache included) after each. Both keep
their results in a resumable JSON run (lminf.eval.runs); lminf.eval.plots draws them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Cache, PreTrainedModel

from lminf.caches.turn_cache import TurnCache
from lminf.eval.methods import Method, resolve_all
from lminf.eval.runs import RunStore
from lminf.families import training_length
from lminf.generation import cache_kwarg, check_ids, chunk_nll, target_nll
from lminf.memory import cache_mib, rss_mib


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL of each run of `bucket` consecutive predicted tokens (a last partial bucket included)."""
    return [float(nll[a : a + bucket].mean()) for a in range(0, len(nll), bucket)]


def run_ppl(
    model: PreTrainedModel,
    documents: dict[str, torch.Tensor],
    methods: list[Method],
    bucket: int,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every (document, method) cell not already in `out_json`; the JSON is rewritten after each."""
    methods = resolve_all(methods, model)
    store = RunStore(out_json, {"bucket": bucket}, "holds a run with bucket {bucket}; use another --out or the same bucket.")
    store.report.update({"training_length": training_length(model.config), **(meta or {})})
    store.record_methods(methods)
    for doc, ids in documents.items():
        for method in methods:
            compute = functools.partial(_ppl_cell, model, doc, ids, method, bucket, progress)
            store.cell(f"{doc}/{method.name}", compute, tokens=ids.shape[1])
    return store.report


def _ppl_cell(model: PreTrainedModel, doc: str, ids: torch.Tensor, method: Method, bucket: int, progress: bool) -> dict:
    start = time.perf_counter()
    nll = method.nll(model, ids, progress=progress)
    return {
        "document": doc,
        "method": method.name,
        "settings": method.settings(),
        "tokens": ids.shape[1],
        "bucket_nll": bucket_means(nll, bucket),
        "bucket_tokens": [len(nll[a : a + bucket]) for a in range(0, len(nll), bucket)],
        "seconds": time.perf_counter() - start,
    }


@dataclass
class StreamState:
    """Where a stream stands: tokens scored so far (`position`), the buckets done, the cache."""

    position: int
    buckets: list[dict]
    cache: Cache


def run_stream(
    model: PreTrainedModel,
    ids: torch.Tensor,
    method: Method,
    bucket: int,
    out_json: Path,
    chunk_size: int = 2048,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """The streaming regime: `ids` (1, n) fed in chunks through the method's bounded cache,
    NLL, speed and memory recorded per bucket. After each bucket the whole state (cache
    included) goes to a checkpoint beside `out_json`, so a run of millions of tokens can be
    stopped and resumed."""
    check_ids(ids)
    (method,) = resolve_all([method], model)
    store = RunStore(out_json, {"regime": "stream"})
    store.report.update({"training_length": training_length(model.config), **(meta or {})})
    if store.results.get(method.name, {}).get("bucket", bucket) != bucket:
        raise ValueError(f"{out_json} holds a {method.name} run with another bucket; use another --out or the same bucket.")
    store.record_methods([method])
    n = ids.shape[1]
    if store.done(method.name, tokens=n):
        return store.report  # finished in an earlier run (its checkpoint is not needed)
    checkpoint = out_json.with_name(f"{out_json.stem}.{method.name}.ckpt")
    with method.patched(model), torch.inference_mode():
        state = _load_checkpoint(checkpoint, model) or StreamState(0, [], method.new_cache(model))
        if state.position > n - 1:
            raise ValueError(f"{checkpoint} is {state.position} tokens into a longer stream; use another --out or more --tokens.")
        bar = tqdm(total=n - 1, initial=state.position, desc=f"stream {method.name}", unit="tok", disable=not progress)
        while state.position < n - 1:
            _stream_bucket(model, ids, state, bucket, chunk_size, bar)
            _save_checkpoint(checkpoint, state)
            cell = {"method": method.name, "settings": method.settings(), "bucket": bucket, "tokens": state.position + 1}
            store.put(method.name, {**cell, "buckets": state.buckets})
        bar.close()
    return store.report


def _stream_bucket(model: PreTrainedModel, ids: torch.Tensor, state: StreamState, bucket: int, chunk_size: int, bar) -> None:
    """Score the tokens up to the end of the current bucket, in chunks that never straddle
    it, and append the bucket's figures to `state`."""
    pos, end_of_bucket = state.position, min((state.position // bucket + 1) * bucket, ids.shape[1] - 1)
    total, count, start = 0.0, 0, time.perf_counter()
    while pos < end_of_bucket:
        end = min(pos + chunk_size, end_of_bucket)
        if isinstance(state.cache, TurnCache):  # it scores every token: the model's own forward feeds it
            nll = chunk_nll(model, ids, pos, end, state.cache)
        else:
            decoder = model.get_decoder()
            hidden = decoder(ids[:, pos:end], **cache_kwarg(decoder, state.cache), use_cache=True).last_hidden_state
            nll = target_nll(model, hidden[0], ids[0, pos + 1 : end + 1])
        total, count = total + float(nll.sum()), count + len(nll)
        bar.update(end - pos)
        pos = end
    seconds = time.perf_counter() - start
    state.position = pos
    state.buckets.append(
        {
            "end": pos,
            "nll": total / count,
            "tokens": count,
            "tokens_per_s": count / seconds,
            "cache_mib": cache_mib(state.cache),
            "rss_mib": rss_mib(),
        }
    )


def _load_checkpoint(path: Path, model: PreTrainedModel) -> StreamState | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False, map_location=model.device)  # our own file, holding Python objects
    return StreamState(state["position"], state["buckets"], state["cache"])


def _save_checkpoint(path: Path, state: StreamState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"position": state.position, "buckets": state.buckets, "cache": state.cache}, tmp)
    tmp.replace(path)
