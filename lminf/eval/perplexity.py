"""Perplexity by position: per-token NLL of long texts under several methods, bucketed.

Each method is a small class with a `name`, `nll(model, ids)` (per-token NLL, one pass) and
`complete(model, ids, max_new_tokens)` (greedy continuation, for the retrieval tasks in
lminf.retrieval); `run_ppl` runs every
(document, method) cell, saving JSON after each so an interrupted run resumes where it
stopped, and `plot_ppl` draws NLL against position, one line per method.

- `Vanilla`: the unpatched model, one pass (fed through a DynamicCache in chunks).
- `Lminf`: Lambda attention, one pass through a LambdaCache (exactly the one-pass result).
- `Sinks`: the StreamingLLM-style baseline on the same machinery: the same global and
  local tokens, but global tokens at their re-indexed cache positions instead of the cap.
- `Window`: the plain baseline, recomputed: tokens are scored `stride` at a time by the
  vanilla model reading only the last `n_local` tokens, so each token sees between
  n_local - stride and n_local - 1 previous tokens and nothing older.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from lminf.patching import make_cache, patch, prefill, unpatch


@torch.inference_mode()
def token_nll(
    model: PreTrainedModel, ids: torch.Tensor, cache: Cache, chunk_size: int = 2048, progress: bool = True
) -> torch.Tensor:
    """NLL (nats) of tokens 1..n-1 of `ids` (1, n), each given all tokens before it -> (n - 1,) float32."""
    _check_ids(ids)
    nll = []
    n = ids.shape[1]
    for a in tqdm(range(0, n - 1, chunk_size), desc="nll", unit="chunk", disable=not progress):
        b = min(a + chunk_size, n - 1)
        hidden = model.model(ids[:, a:b], past_key_values=cache, use_cache=True).last_hidden_state
        nll.append(_nll(model, hidden[0], ids[0, a + 1 : b + 1]))
    return torch.cat(nll)


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL of each run of `bucket` consecutive predicted tokens (a last partial bucket included)."""
    return [float(nll[a : a + bucket].mean()) for a in range(0, len(nll), bucket)]


@torch.inference_mode()
def greedy(model: PreTrainedModel, ids: torch.Tensor, cache: Cache, max_new_tokens: int, chunk_size: int = 2048) -> list[int]:
    """Greedy continuation of `ids` (1, n); the prompt goes through `cache` in chunks."""
    _check_ids(ids)
    prefill(model, ids[:, :-1], cache, chunk_size=chunk_size)
    token, out = ids[:, -1:], []
    for _ in range(max_new_tokens):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out


class Vanilla:
    name = "vanilla"

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        return token_nll(model, ids, DynamicCache(), progress=progress)

    def complete(self, model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        return greedy(model, ids, DynamicCache(), max_new_tokens)


@dataclass(frozen=True)
class Lminf:
    n_global: int = 10
    n_local: int | None = None
    top_k: int = 0
    top_k_from_layer: int = 4
    global_distance = "capped"

    @property
    def name(self) -> str:
        return "lminf" if not self.top_k else f"lminf-top{self.top_k}"

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        with self.patched(model):
            return token_nll(model, ids, make_cache(model), progress=progress)

    def complete(self, model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        with self.patched(model):
            return greedy(model, ids, make_cache(model), max_new_tokens)

    @contextmanager
    def patched(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        patch(model, self.n_global, self.n_local, self.top_k, self.top_k_from_layer, global_distance=self.global_distance)
        try:
            yield model
        finally:
            unpatch(model)


@dataclass(frozen=True)
class Sinks(Lminf):
    name = "sinks"
    global_distance = "reindexed"


@dataclass(frozen=True)
class Window:
    n_local: int | None = None  # default: the model's training length
    stride: int | None = None  # default: n_local // 4

    name = "window"

    @torch.inference_mode()
    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        _check_ids(ids)
        window = self.n_local or model.config.max_position_embeddings
        stride = self.stride or max(1, window // 4)
        if not 1 <= stride < window:
            raise ValueError(f"window stride must be in 1..{window - 1}, got {stride}.")
        n, nll = ids.shape[1], []
        for a in tqdm(range(1, n, stride), desc="window", unit="step", disable=not progress):
            b = min(a + stride, n)  # score targets a .. b-1
            start = max(0, b - window)  # the last target reads window - 1 tokens before it
            hidden = model.model(ids[:, start : b - 1], use_cache=False).last_hidden_state
            nll.append(_nll(model, hidden[0, a - 1 - start :], ids[0, a:b]))
        return torch.cat(nll)

    def complete(self, model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        window = self.n_local or model.config.max_position_embeddings
        if max_new_tokens >= window:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for input in a window of {window}.")
        # The prompt is cut so that the last generated token still sees only `window` tokens.
        return greedy(model, ids[:, -(window - max_new_tokens) :], DynamicCache(), max_new_tokens)


def run_ppl(
    model: PreTrainedModel,
    documents: dict[str, torch.Tensor],
    methods: list,
    bucket: int,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every (document, method) cell not already in `out_json`; the JSON is rewritten after each."""
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    if report and report.get("bucket") != bucket:
        raise ValueError(f"{out_json} holds a run with bucket {report.get('bucket')}; use another --out or the same bucket.")
    report.update({"bucket": bucket, "training_length": model.config.max_position_embeddings, **(meta or {})})
    cells = report.setdefault("results", {})
    for doc, ids in documents.items():
        for method in methods:
            key = f"{doc}/{method.name}"
            if key in cells and cells[key]["tokens"] == ids.shape[1]:
                continue  # done in an earlier run
            start = time.perf_counter()
            nll = method.nll(model, ids, progress=progress)
            cells[key] = {
                "document": doc,
                "method": method.name,
                "settings": vars(method) if hasattr(method, "__dataclass_fields__") else {},
                "tokens": ids.shape[1],
                "bucket_nll": bucket_means(nll, bucket),
                "bucket_tokens": [len(nll[a : a + bucket]) for a in range(0, len(nll), bucket)],
                "seconds": time.perf_counter() - start,
            }
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(report, indent=2))
    return report


def run_stream(
    model: PreTrainedModel,
    ids: torch.Tensor,
    method: Lminf,
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
    _check_ids(ids)
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    if report.get("results", {}).get(method.name, {}).get("bucket", bucket) != bucket:
        raise ValueError(f"{out_json} holds a {method.name} run with another bucket; use another --out or the same bucket.")
    report.update({"regime": "stream", "training_length": model.config.max_position_embeddings, **(meta or {})})
    checkpoint = out_json.with_name(f"{out_json.stem}.{method.name}.ckpt")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    n = ids.shape[1]
    if report.get("results", {}).get(method.name, {}).get("tokens") == n:
        return report  # finished in an earlier run (its checkpoint is not needed)
    with method.patched(model), torch.inference_mode():
        if checkpoint.exists():  # our own file, holding Python objects: not weights_only
            state = torch.load(checkpoint, weights_only=False, map_location=model.device)
        else:
            state = {"position": 0, "buckets": [], "cache": make_cache(model)}
        pos, cache, buckets = state["position"], state["cache"], state["buckets"]
        if pos > n - 1:
            raise ValueError(f"{checkpoint} is {pos} tokens into a longer stream; use another --out or more --tokens.")
        bar = tqdm(total=n - 1, initial=pos, desc=f"stream {method.name}", unit="tok", disable=not progress)
        total, count, start = 0.0, 0, time.perf_counter()
        while pos < n - 1:
            end = min(pos + chunk_size, (pos // bucket + 1) * bucket, n - 1)  # chunks never straddle a bucket
            hidden = model.model(ids[:, pos:end], past_key_values=cache, use_cache=True).last_hidden_state
            nll = _nll(model, hidden[0], ids[0, pos + 1 : end + 1])
            total, count = total + float(nll.sum()), count + len(nll)
            bar.update(end - pos)
            pos = end
            if pos % bucket == 0 or pos == n - 1:
                seconds = time.perf_counter() - start
                buckets.append(
                    {
                        "end": pos,
                        "nll": total / count,
                        "tokens": count,
                        "tokens_per_s": count / seconds,
                        "cache_mib": cache.memory_bytes() / 2**20,
                        "rss_mib": _rss_mib(),
                    }
                )
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"position": pos, "buckets": buckets, "cache": cache}, tmp)
                tmp.replace(checkpoint)
                report.setdefault("results", {})[method.name] = {
                    "method": method.name,
                    "settings": vars(method),
                    "bucket": bucket,
                    "tokens": pos + 1,
                    "buckets": buckets,
                }
                out_json.write_text(json.dumps(report, indent=2))
                total, count, start = 0.0, 0, time.perf_counter()
        bar.close()
    return report


def plot_stream(report: dict, out_png: Path) -> None:
    """NLL, and memory, against tokens streamed: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for cell in report["results"].values():
        x = [b["end"] for b in cell["buckets"]]
        top.plot(x, [b["nll"] for b in cell["buckets"]], marker="o", markersize=2, label=cell["method"])
        bottom.plot(x, [b["rss_mib"] for b in cell["buckets"]], label=f"{cell['method']} process RSS")
        bottom.plot(x, [b["cache_mib"] for b in cell["buckets"]], linestyle="--", label=f"{cell['method']} KV cache")
    top.set(ylabel="mean NLL per bucket (nats/token)", title=f"streaming ({report.get('document', '')})")
    bottom.set(xlabel="tokens streamed", ylabel="MiB", ylim=(0, None))
    top.legend()
    bottom.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _rss_mib() -> float:
    """Resident memory now (not the peak), from /proc where there is one."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def plot_ppl(report: dict, out_png: Path) -> None:
    """NLL against position, one panel per document, one line per method, the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    documents = sorted({cell["document"] for cell in report["results"].values()})
    fig, axes = plt.subplots(1, len(documents), figsize=(6 * len(documents), 4), squeeze=False)
    for ax, doc in zip(axes[0], documents, strict=True):
        cells = [cell for cell in report["results"].values() if cell["document"] == doc]
        for n, cell in enumerate(cells):
            x = [(k + 0.5) * report["bucket"] for k in range(len(cell["bucket_nll"]))]
            # Methods often coincide: shrinking markers and varied dashes keep each line visible.
            style = dict(marker="o", markersize=7 - 1.5 * (n % 4), linestyle=["-", "--", "-.", ":"][n % 4])
            ax.plot(x, cell["bucket_nll"], label=cell["method"], **style)
        ax.axvline(report["training_length"], color="grey", linestyle="--", label="training length")
        ax.set(title=doc, xlabel="position (tokens)", ylabel="mean NLL (nats/token)")
        ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _nll(model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden[: len(targets)]).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _check_ids(ids: torch.Tensor) -> None:
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"need ids of shape (1, n) with n >= 2, got {tuple(ids.shape)}.")
