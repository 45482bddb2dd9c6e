"""vLLM's CPU attention backend with an lminf strategy in place of its attention.

For each request of a batch the keys the strategy reads (`Strategy.keys_for`: the first
tokens and the recent tail) are gathered from vLLM's paged cache by position, and the
strategy's own attention runs on them with the request's true positions, exactly as in
the transformers path. Writing the cache and building the metadata stay vLLM's.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from lminf.families import rotary_inv_freq
from lminf.layout import Layout
from lminf.strategies import AttentionCall, Strategy, build
from lminf.vllm import CONFIG_KEY
from lminf.vllm.kv_cache import KeepFirstLastSpec, kept_span

logger = init_logger("vllm.lminf")  # under vLLM's logger, so it prints with vLLM's own lines


def strategy_from_config(vllm_config) -> Strategy | None:
    """The strategy the engine's additional_config asks for (None: plain vLLM), resolved and
    checked against the model."""
    extra = vllm_config.additional_config
    settings = dict(extra.get(CONFIG_KEY) or {}) if isinstance(extra, dict) else {}
    if not settings:
        return None
    hf_config = vllm_config.model_config.hf_config
    return build(settings.pop("strategy", "lminf"), **settings).resolve(hf_config)


class LminfCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.strategy = strategy_from_config(vllm_config)
        if self.strategy is not None:
            if self.sliding_window != -1 or self.alibi_slopes is not None or self.logits_soft_cap:
                raise ValueError("lminf in vLLM supports plain rotary full-attention layers only.")
            self.inv_freq = rotary_inv_freq(vllm_config.model_config.hf_config).float()
            logger.info_once("lminf: attention runs %s", self.strategy)
        LminfCPUAttentionBackend.layer_strategy = self.strategy
        LminfCPUAttentionBackend.in_flight_tokens = vllm_config.max_in_flight_tokens
        self._call: AttentionCall | None = None  # made at the first forward, when the layer's name is known

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        # Batches that fit where the strategy is plain attention run vLLM's own kernel.
        plain = self.strategy is None or attn_metadata is None or int(attn_metadata.seq_lens.max()) <= self.strategy.plain_up_to()
        if plain:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
        if self._call is None:
            check_cache_layout(layer.isa, block_size, self.head_size, query.dtype)
            self._call = AttentionCall(layer=extract_layer_index(layer.layer_name), inv_freq=self.inv_freq, scaling=self.scale)
        call = self._call
        starts = attn_metadata.query_start_loc.tolist()
        for r, total in enumerate(attn_metadata.seq_lens.tolist()):
            a, b = starts[r], starts[r + 1]
            if a == b:
                continue
            q_start = total - (b - a)
            n_first, tail = self.strategy.keys_for(q_start, total)
            positions = torch.cat((torch.arange(n_first), torch.arange(tail, total)))
            blocks = attn_metadata.block_table[r, positions // block_size]
            slots = positions % block_size
            k = read_keys(key_cache, blocks, slots).transpose(0, 1)[None]  # (1, Hkv, K, D)
            v = value_cache[blocks, :, slots].transpose(0, 1)[None]
            q = query[a:b].transpose(0, 1)[None]  # (1, Hq, Q, D)
            valid = torch.ones(1, len(positions), dtype=torch.bool)  # vLLM rows hold no padding
            layout = Layout(q_pos=torch.arange(q_start, total)[None], k_pos=positions[None], k_valid=valid)
            out = self.strategy.attention(q, k, v, layout, call)  # (1, Hq, Q, D)
            output[a:b] = out[0].transpose(0, 1).reshape(output[a:b].shape)
        return output


def read_keys(key_cache: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys (N, Hkv, D) of the tokens at (blocks, slots). vLLM's CPU kernel ("vec" ISA) stores
    each block's keys transposed, (D, block_size) per head, inside a (block_size, D) view."""
    num_blocks, heads, block_size, dim = key_cache.shape
    return key_cache.reshape(num_blocks, heads, dim, block_size)[blocks, :, :, slots]


def check_cache_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> None:
    """Write known keys and values with vLLM's own cache writer and read them back as
    `forward` does: a vLLM whose CPU cache layout differs fails here, loudly, not silently."""
    from vllm import _custom_ops as ops

    heads, n = 2, block_size + 3
    kv = torch.zeros(3, heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = kv.view(3, heads, block_size * 2, -1).chunk(2, dim=2)
    keys = torch.randn(n, heads, head_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    values = keys.flip(-1).contiguous()
    slots = torch.arange(n) + block_size  # from block 1 on
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0)
    blocks, offsets = slots // block_size, slots % block_size
    if not (torch.equal(read_keys(key_cache, blocks, offsets), keys) and torch.equal(value_cache[blocks, :, offsets], values)):
        raise RuntimeError(
            f"lminf cannot read vLLM's CPU KV cache layout (isa {isa!r}, block size {block_size}, head size {head_size}, "
            f"{dtype}); this vLLM version or CPU is not supported by lminf.vllm."
        )


class LminfCPUAttentionBackend(CPUAttentionBackend):
    # vLLM calls customize_spec without its config (none is current then), after building
    # the layers in the same worker process: their impl leaves the strategy here.
    layer_strategy: Strategy | None = None
    in_flight_tokens = 0

    @staticmethod
    def get_impl_cls() -> type[LminfCPUAttentionImpl]:
        return LminfCPUAttentionImpl

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """A full-attention layer under a strategy that reads only its first and last tokens
        gets the KV policy that frees the blocks in between (lminf.vllm.kv_cache)."""
        spec = super().customize_spec(spec)
        strategy = cls.layer_strategy
        span = kept_span(strategy) if strategy is not None else None
        if span is None or type(spec) is not FullAttentionSpec:
            return spec
        keep_first, keep_last = span
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        spec = KeepFirstLastSpec(**fields, keep_first=keep_first, keep_last=keep_last, in_flight_tokens=cls.in_flight_tokens)
        logger.info_once(
            "lminf: KV cache per request bounded at %d blocks of %d tokens (first %d + last %d tokens + %d in flight)",
            spec.max_admission_blocks_per_request(cls.in_flight_tokens, 1 << 62),
            spec.block_size,
            keep_first,
            keep_last,
            cls.in_flight_tokens,
        )
        return spec
