"""vLLM's CPU attention backend with an lminf strategy in place of its attention.

Two paths, chosen per request of a batch:

- vLLM's own paged kernel, for requests inside the window (there the strategy is plain
  attention) and for decoding steps of a strategy that reads the first tokens and a window
  (`WindowedStrategy`): the first tokens, rotated to where the strategy reads them from the
  query's own position, are written just past the request's last token, into free slots of
  its last, partly filled block, and the kernel runs with a sliding window of
  n_global + n_local keys over that extended sequence. It then reads exactly the window
  and the placed first tokens in place, batched, with no copy of the window.
- otherwise (prefill chunks past the window, the first n_global steps past it, a last
  block with too little room, top-k), the keys the strategy reads (`Strategy.keys_for`)
  are gathered from the paged cache by position and the strategy's own attention runs on
  them with the request's true positions, exactly as in the transformers path.

Writing the cache and building the metadata stay vLLM's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from lminf.families import rotary_inv_freq
from lminf.layout import Layout
from lminf.rope import rotate, rotation
from lminf.strategies import AttentionCall, Strategy, build
from lminf.strategies.windowed import WindowedStrategy
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
    strategy = build(settings.pop("strategy", "lminf"), **settings).resolve(hf_config)
    if strategy.stateful:  # its memory lives in lminf's own cache, which vLLM's paged blocks are not
        try:
            strategy.keys_for(0, 1)
            why = "it keeps state in lminf's cache"
        except NotImplementedError as error:  # the strategy's own reason
            why = str(error).rstrip(".")
        raise ValueError(f"strategy {strategy.name!r} runs through lminf.patch, not vLLM yet: {why}.")
    if not strategy.same_across_calls:  # vLLM's scheduler splits prompts into its own chunks
        raise ValueError(f"strategy {strategy.name!r} depends on how the input is split into calls; run it through lminf.patch.")
    return strategy


@dataclass
class KernelRows:
    """The requests of one batch that vLLM's kernel computes, in vLLM's metadata form."""

    tokens: torch.Tensor | None  # their query tokens; None: the batch's first num_tokens
    num_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor  # decoding rows past the window: + n_global placed first tokens
    block_table: torch.Tensor
    window: int  # the kernel's sliding window: the keys each query keeps
    scheduler_metadata: torch.Tensor | None = None
    # Decoding rows past the window: the first tokens' cache slots, the slots they are
    # written to, and the rotation that places them.
    first_blocks: torch.Tensor | None = None  # (R, n_global)
    first_slots: torch.Tensor | None = None  # (n_global,)
    write_slots: torch.Tensor | None = None  # (R * n_global,)
    placing: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepPlan:
    """How one forward's batch is split between the two paths; the same for every layer."""

    kernel: KernelRows | None
    gathered: list[int]  # requests that take the gather path
    lengths: torch.Tensor  # the batch it was made for (seq_lens, then query_start_loc)


class LminfCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.strategy = strategy_from_config(vllm_config)
        if self.strategy is not None:
            if self.sliding_window != -1 or self.alibi_slopes is not None or self.logits_soft_cap or self.sinks is not None:
                raise ValueError(
                    "lminf in vLLM supports plain rotary full-attention layers only; this model has sliding-window, "
                    "ALiBi, soft-capped or sink layers: run it through transformers (lminf.patch)."
                )
            self.inv_freq = rotary_inv_freq(vllm_config.model_config.hf_config).float()
            logger.info_once("lminf: attention runs %s", self.strategy)
        LminfCPUAttentionBackend.layer_strategy = self.strategy
        LminfCPUAttentionBackend.in_flight_tokens = vllm_config.max_in_flight_tokens
        self._call: AttentionCall | None = None  # made at the first forward, when the layer's name is known

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        # Batches that fit where the strategy is plain attention run vLLM's own kernel as is.
        plain = self.strategy is None or attn_metadata is None or int(attn_metadata.seq_lens.max()) <= self.strategy.plain_up_to()
        if plain:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
        if self._call is None:
            check_cache_layout(layer.isa, block_size, self.head_size, query.dtype)
            self._call = AttentionCall(layer=extract_layer_index(layer.layer_name), inv_freq=self.inv_freq, scaling=self.scale)
        plan = self._plan(attn_metadata, layer.isa, block_size, query.dtype)
        if plan.kernel is not None:
            self._kernel(layer, plan.kernel, query, key_cache, value_cache, output)
        for r in plan.gathered:
            self._gathered(r, attn_metadata, query, key_cache, value_cache, output)
        return output

    def _plan(self, meta, isa: str, block_size: int, dtype: torch.dtype) -> StepPlan:
        # Every layer of a forward gets the same metadata object: plan once, reuse (checked
        # against the batch, should a vLLM version ever reuse the object for another step).
        lengths = torch.cat((meta.seq_lens, meta.query_start_loc))
        cached = getattr(meta, "_lminf_plan", None)
        if cached is not None and torch.equal(cached.lengths, lengths):
            return cached
        strategy = self.strategy
        n_global = strategy.n_global if isinstance(strategy, WindowedStrategy) and not strategy.keeps_middle else None
        starts, totals = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        plain, placed, gathered = [], [], []
        for r, total in enumerate(totals):
            n = starts[r + 1] - starts[r]
            if n == 0:
                continue
            if total <= strategy.plain_up_to():
                plain.append(r)
            elif n == 1 and n_global is not None and fits_placed(strategy, total, block_size):
                placed.append(r)
            else:
                gathered.append(r)
        kernel = None
        if plain or placed:
            kernel = self._kernel_rows(meta, plain, placed, n_global or 0, isa, block_size, dtype, whole=not gathered)
        plan = StepPlan(kernel=kernel, gathered=gathered, lengths=lengths)
        meta._lminf_plan = plan
        return plan

    def _kernel_rows(
        self, meta, plain: list[int], placed: list[int], n_global: int, isa: str, block_size: int, dtype, whole: bool
    ):
        rows = sorted(plain + placed)
        index = torch.tensor(rows, dtype=torch.long)
        starts = meta.query_start_loc
        seq_lens = meta.seq_lens[index].clone()
        seq_lens[torch.isin(index, torch.tensor(placed, dtype=torch.long))] += n_global
        query_start_loc = torch.zeros(len(rows) + 1, dtype=starts.dtype)
        torch.cumsum(starts[1:][index] - starts[:-1][index], 0, out=query_start_loc[1:])
        tokens = None if whole else torch.cat([torch.arange(int(starts[r]), int(starts[r + 1])) for r in rows])
        kernel = KernelRows(
            tokens=tokens,
            num_tokens=int(query_start_loc[-1]),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=meta.block_table[index],
            window=n_global + self.strategy.n_local if placed else -1,
        )
        kernel.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(rows),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=kernel.window,
            isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        if placed and n_global:
            p = torch.tensor(placed, dtype=torch.long)
            last = meta.seq_lens[p].long() - 1  # each request's query position i
            first = torch.arange(n_global)
            kernel.first_blocks = meta.block_table[p][:, first // block_size].long()
            kernel.first_slots = first % block_size
            last_block = meta.block_table[p, last // block_size].long()
            kernel.write_slots = ((last_block * block_size + last % block_size + 1)[:, None] + first).reshape(-1)
            kernel.placing = rotation(placed_shift(self.strategy, last[:, None], first[None, :]), self.inv_freq)
        return kernel

    def _kernel(self, layer, rows: KernelRows, query, key_cache, value_cache, output) -> None:
        """vLLM's kernel over the requests of `rows`, the first tokens placed past the last one."""
        if rows.placing is not None:
            keys = read_keys(key_cache, rows.first_blocks, rows.first_slots)  # (R, G, Hkv, D)
            values = value_cache[rows.first_blocks, :, rows.first_slots]
            keys = rotate(keys.transpose(1, 2), rows.placing).transpose(1, 2)
            ops.cpu_attn_reshape_and_cache(
                keys.reshape(-1, *keys.shape[2:]).contiguous(),
                values.reshape(-1, *values.shape[2:]).contiguous(),
                key_cache,
                value_cache,
                rows.write_slots,
                layer.isa,
                k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        if rows.tokens is None:
            q, out = query[: rows.num_tokens], output[: rows.num_tokens]
        else:
            q, out = query[rows.tokens], output.new_empty((rows.num_tokens, *output.shape[1:]))
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=rows.query_start_loc,
            seq_lens=rows.seq_lens,
            scale=self.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=rows.window,
            block_table=rows.block_table,
            softcap=0,
            scheduler_metadata=rows.scheduler_metadata,
            s_aux=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        if rows.tokens is not None:
            output[rows.tokens] = out

    def _gathered(self, r: int, meta, query, key_cache, value_cache, output) -> None:
        """Request r through the strategy's own attention over the keys it reads, gathered."""
        a, b = int(meta.query_start_loc[r]), int(meta.query_start_loc[r + 1])
        total, block_size = int(meta.seq_lens[r]), key_cache.shape[2]
        q_start = total - (b - a)
        first_end, tail = self.strategy.keys_for(q_start, total)
        positions = torch.cat((torch.arange(first_end), torch.arange(tail, total)))
        blocks = meta.block_table[r, positions // block_size]
        slots = positions % block_size
        k = read_keys(key_cache, blocks, slots).transpose(0, 1)[None]  # (1, Hkv, K, D)
        v = value_cache[blocks, :, slots].transpose(0, 1)[None]
        q = query[a:b].transpose(0, 1)[None]  # (1, Hq, Q, D)
        valid = torch.ones(1, len(positions), dtype=torch.bool)  # vLLM rows hold no padding
        layout = Layout(q_pos=torch.arange(q_start, total)[None], k_pos=positions[None], k_valid=valid)
        out = self.strategy.attention(q, k, v, layout, self._call)  # (1, Hq, Q, D)
        output[a:b] = out[0].transpose(0, 1).reshape(output[a:b].shape)


def fits_placed(strategy: WindowedStrategy, total: int, block_size: int) -> bool:
    """Whether a decoding step at position total - 1 can run in vLLM's kernel: it reads all
    n_global first tokens as far keys (none is inside its window yet), and its last block
    has room for them past the query."""
    first_end, _ = strategy.keys_for(total - 1, total)
    room = block_size - 1 - (total - 1) % block_size
    return first_end == strategy.n_global and room >= strategy.n_global


def placed_shift(strategy: WindowedStrategy, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """How far to rotate first token j (stored at its position) so that the query, at its own
    position i, scores it as the strategy does: at distance q_at - k_at."""
    q_at, k_at = strategy.far_positions(i, j)
    distance = q_at - (j if k_at is None else k_at)
    return i - distance - j


def read_keys(key_cache: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys (N, Hkv, D) of the tokens at (blocks, slots). vLLM's CPU kernel ("vec" ISA) stores
    each block's keys transposed, (D, block_size) per head, inside a (block_size, D) view."""
    num_blocks, heads, block_size, dim = key_cache.shape
    return key_cache.reshape(num_blocks, heads, dim, block_size)[blocks, :, :, slots]


def check_cache_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> None:
    """Write known keys and values with vLLM's own cache writer and read them back as
    `forward` does: a vLLM whose CPU cache layout differs fails here, loudly, not silently."""
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
        n_global, n_local = span
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        spec = KeepFirstLastSpec(**fields, n_global=n_global, n_local=n_local, in_flight_tokens=cls.in_flight_tokens)
        logger.info_once(
            "lminf: KV cache per request bounded at %d blocks of %d tokens (first %d + last %d tokens + %d in flight)",
            spec.max_admission_blocks_per_request(cls.in_flight_tokens, 1 << 62),
            spec.block_size,
            n_global,
            n_local,
            cls.in_flight_tokens,
        )
        return spec
