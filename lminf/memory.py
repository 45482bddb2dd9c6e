"""Memory figures, measured one way wherever lminf reports them (CLI, evaluations, benchmark).

- `peak_mib(device)`: the most memory the process has held so far: the CUDA allocator's
  peak on a GPU, the peak resident set (RSS) of the process otherwise.
- `rss_mib()`: the resident set now (not the peak).
- `cache_mib(cache)`: what a transformers `Cache` holds (a LambdaCache counts its spare room);
  for a block memory (InfLLM) what it holds on the compute device.
- `cache_tiers(cache)`: that, the host tier and the block index apart, and the resident set.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch


def peak_mib(device: str | torch.device = "cpu") -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_bytes() / 2**20


def rss_mib() -> float:
    """Resident memory now, from /proc where there is one (else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return _peak_rss_bytes() / 2**20


def cache_mib(cache) -> float:
    if hasattr(cache, "memory_bytes"):  # LambdaCache: its spare room counts too
        return cache.memory_bytes() / 2**20
    tensors = (t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2**20


def cache_tiers(cache) -> dict:
    """A cache's memory by where it lives, in MiB: keys and values on the compute device, those
    in host memory (a block memory's blocks: InfLLM), the block index (its representatives), and
    the process's resident set now."""
    layers = getattr(cache, "layers", [])
    host = sum(layer.host_bytes() for layer in layers if hasattr(layer, "host_bytes"))
    index = sum(layer.index_bytes() for layer in layers if hasattr(layer, "index_bytes"))
    return {
        "device_kv_mib": round(cache_mib(cache), 1),
        "host_kv_mib": round(host / 2**20, 1),
        "index_mib": round(index / 2**20, 1),
        "rss_mib": round(rss_mib()),
    }


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
