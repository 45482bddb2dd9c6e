"""Perplexity by position: per-token NLL of long texts under several methods, bucketed.

Each method is a small class with a `name` and `nll(model, ids)`; `run_ppl` runs every
(document, method) cell, saving JSON after each so an interrupted run resumes where it
stopped, and `plot_ppl` draws NLL against position, one line per method.

- `Vanilla`: the unpatched model, one pass (fed through a DynamicCache in chunks).
- `Lminf`: Lambda attention, one pass through a LambdaCache (exactly the one-pass result).
- `Window`: the plain baseline, recomputed: tokens are scored `stride` at a time by the
  vanilla model reading only the last `n_local` tokens, so each token sees between
  n_local - stride and n_local - 1 previous tokens and nothing older.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from lminf.integration import make_cache, patch, unpatch


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


class Vanilla:
    name = "vanilla"

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        return token_nll(model, ids, DynamicCache(), progress=progress)


@dataclass(frozen=True)
class Lminf:
    n_global: int = 10
    n_local: int | None = None
    top_k: int = 0
    top_k_from_layer: int = 4

    @property
    def name(self) -> str:
        return "lminf" if not self.top_k else f"lminf-top{self.top_k}"

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        patch(model, self.n_global, self.n_local, self.top_k, self.top_k_from_layer)
        try:
            return token_nll(model, ids, make_cache(model), progress=progress)
        finally:
            unpatch(model)


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
                "seconds": time.perf_counter() - start,
            }
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(report, indent=2))
    return report


def plot_ppl(report: dict, out_png: Path) -> None:
    """NLL against position, one panel per document, one line per method, the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    documents = sorted({cell["document"] for cell in report["results"].values()})
    fig, axes = plt.subplots(1, len(documents), figsize=(6 * len(documents), 4), squeeze=False)
    for ax, doc in zip(axes[0], documents, strict=True):
        for cell in report["results"].values():
            if cell["document"] == doc:
                x = [(k + 0.5) * report["bucket"] for k in range(len(cell["bucket_nll"]))]
                ax.plot(x, cell["bucket_nll"], marker="o", markersize=3, label=cell["method"])
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
