"""Per-token negative log-likelihood of a long text, fed through a cache in chunks.

Chunking bounds activation memory (logits are never built for more than one chunk),
and through a `LambdaCache` it gives exactly the one-pass Lambda-attention result.
"""

from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import Cache, PreTrainedModel


@torch.inference_mode()
def token_nll(
    model: PreTrainedModel, ids: torch.Tensor, cache: Cache, chunk_size: int = 2048, progress: bool = True
) -> torch.Tensor:
    """NLL (nats) of tokens 1..n-1 of `ids` (1, n), each given all tokens before it -> (n - 1,) float32."""
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"token_nll needs ids of shape (1, n) with n >= 2, got {tuple(ids.shape)}.")
    nll = []
    n = ids.shape[1]
    for a in tqdm(range(0, n - 1, chunk_size), desc="nll", unit="chunk", disable=not progress):
        b = min(a + chunk_size, n - 1)
        hidden = model.model(ids[:, a:b], past_key_values=cache, use_cache=True).last_hidden_state
        logits = model.lm_head(hidden[0]).float()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, a + 1 : b + 1], reduction="none"))
    return torch.cat(nll)


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL of each run of `bucket` consecutive predicted tokens (a last partial bucket included)."""
    return [float(nll[a : a + bucket].mean()) for a in range(0, len(nll), bucket)]
