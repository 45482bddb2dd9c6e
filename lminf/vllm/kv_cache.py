"""A vLLM KV-cache policy that keeps, per request, only the blocks a strategy reads.

A strategy that reads the first `n_global` tokens and the last `n_local` ones (what
`Strategy.keys_for` says for lminf and sinks) gets `KeepFirstLastSpec` as its layers' KV
spec. Its manager frees every block that lies wholly between the two, as soon as no
query still to come can read it, so a request holds about n_global + n_local + one
prefill chunk tokens whatever its length; vLLM sizes its pool and admits requests by
that bound instead of by `max_model_len`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from lminf.strategies import Strategy

FAR = 1 << 40  # a query position past any real input, to read a strategy's steady shape off keys_for


def kept_span(strategy: Strategy) -> tuple[int, int] | None:
    """(n_global, n_local) when the strategy's queries read only the first `n_global`
    tokens and the `n_local` most recent ones (the query included), the same at every
    position; None when it reads more (top-k keeps the whole middle)."""
    spans = set()
    for q in (FAR, FAR + 12345):
        first_end, tail = strategy.keys_for(q, q + 1)
        spans.add((first_end, q - tail + 1))
    if len(spans) != 1:
        return None  # the shape moves with the position
    span = spans.pop()
    return span if span[1] <= FAR // 2 else None  # a "window" as long as the input: it keeps everything


@dataclass(frozen=True, kw_only=True)
class KeepFirstLastSpec(FullAttentionSpec):
    n_global: int = 0  # first tokens of a request kept for good
    n_local: int = 0  # most recent tokens kept (a query's window, itself included)
    # Tokens scheduled but not yet processed (vLLM's max_in_flight_tokens): the manager,
    # which vLLM builds without its config, needs it for the admission cap.
    in_flight_tokens: int = 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """The most blocks a request holds: the first tokens, the window below the oldest
        query in flight, the tokens in flight, one partly used block at each edge."""
        kept = cdiv(self.n_global, self.block_size) + cdiv(self.n_local - 1 + max_in_flight_tokens, self.block_size) + 1
        return min(kept, cdiv(max_model_len, self.block_size))

    def max_memory_usage_bytes(self, vllm_config) -> int:
        blocks = self.max_admission_blocks_per_request(vllm_config.max_in_flight_tokens, vllm_config.model_config.max_model_len)
        return blocks * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[KeepFirstLastSpec]) -> KeepFirstLastSpec:
        kept = {(s.n_global, s.n_local, s.in_flight_tokens) for s in specs}
        if len(kept) != 1:
            raise ValueError(f"lminf: layers of one KV cache group keep different spans {sorted(kept)}.")
        n_global, n_local, in_flight = kept.pop()
        return dataclasses.replace(super().merge(specs), n_global=n_global, n_local=n_local, in_flight_tokens=in_flight)


class KeepFirstLastManager(FullAttentionManager):
    """Full attention's manager (prefix caching included) that frees the middle blocks."""

    def __init__(self, kv_cache_spec: KeepFirstLastSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        # vLLM hands an admission cap only to the managers it knows recycle blocks (by type);
        # without one, admission checks a request's whole length against the pool and a
        # prompt longer than the pool waits forever.
        self.max_admission_blocks_per_request = kv_cache_spec.max_admission_blocks_per_request(
            kv_cache_spec.in_flight_tokens, FAR
        )

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        # The next query (at position processed_computed_tokens) and every later one read
        # nothing in [n_global, its window start): free the blocks wholly inside.
        spec: KeepFirstLastSpec = self.kv_cache_spec
        window_start = processed_computed_tokens - spec.n_local + 1
        self._remove_blocks_in_range(request_id, cdiv(spec.n_global, self.block_size), window_start // self.block_size)


def register_spec() -> None:
    """Make vLLM's registry know the spec, after its built-in specs: the registry fills in
    its built-ins only while it is empty, so registering first would drop them all."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(KeepFirstLastSpec, KeepFirstLastManager, uniform_type_base_spec=FullAttentionSpec)
    if (
        KVCacheSpecRegistry.get_manager_class(FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32))
        is None
    ):
        raise RuntimeError("lminf: vLLM's KV cache spec registry lost its built-in specs; this vLLM is not supported.")
