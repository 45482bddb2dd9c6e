"""InfLLM (Xiao et al., 2024, arXiv 2402.04617): LM-Infinite's frame plus a memory of the
text that left the window, in blocks, retrieved per query. See attention.py for the rule
and memory.py for where the blocks live.

Defaults, from InfLLM's Mistral-7B setting (32K training length: 128 initial tokens, 4,096
local, 16 blocks of 128 retrieved, 4 representative keys, 32 hot blocks), with the window
scaled to half the model's training length: on the default model (8,192) that is 128 +
4,096 + 16 x 128 = 6,272 keys per query, inside the training length, and no distance above
the window (the cap) is ever used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from lminf.families import training_length
from lminf.layout import Layout
from lminf.strategies.base import AttentionCall, Rule, register
from lminf.strategies.infllm.attention import block_memory_attention
from lminf.strategies.infllm.memory import BlockMemoryLayer
from lminf.strategies.windowed import WindowedStrategy

PADDING = "strategy infllm does not support padded batches: run rows of different lengths one at a time."


@register
@dataclass(frozen=True)
class InfLLM(WindowedStrategy):
    """The first `n_global` tokens and the last `n_local` ones, as LM-Infinite (the first ones
    at the capped distance n_local), and from memory each query's `top_blocks` best blocks of
    `block_size` tokens, capped too. The cache keeps the window on the compute device and the
    blocks in host memory (`memory_dir`: in memory-mapped files there), `hot_blocks` of them
    also on the device."""

    name = "infllm"
    stateful = True
    pads = False

    n_global: int = field(default=128, metadata={"help": "first tokens every query sees"})
    block_size: int = field(default=128, metadata={"help": "tokens per memory block (infllm)"})
    top_blocks: int = field(default=16, metadata={"help": "memory blocks each query reads (infllm)"})
    repr_topk: int = field(default=4, metadata={"help": "keys that represent a block (infllm)"})
    hot_blocks: int = field(default=32, metadata={"help": "memory blocks cached on the compute device (infllm)"})
    memory_dir: str = field(default="", metadata={"help": "keep memory blocks in files in this folder (infllm; default RAM)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for setting, least in (("block_size", 1), ("top_blocks", 0), ("repr_topk", 1), ("hot_blocks", 1)):
            if getattr(self, setting) < least:
                raise ValueError(f"{setting} must be >= {least}, got {getattr(self, setting)}.")
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk ({self.repr_topk}) cannot exceed block_size ({self.block_size}).")

    def resolve(self, config: PretrainedConfig) -> InfLLM:
        if self.n_local is None:
            return dataclasses.replace(self, n_local=max(1, training_length(config) // 2))
        return self

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(q_pos, self.n_local), torch.zeros_like(k_pos)  # LM-Infinite's cap

    def cache_bound(self) -> int:
        # first tokens + the window and the block leaving it + the hot blocks
        return self.n_global + self.n_local + self.block_size + self.hot_blocks * self.block_size

    def keys_for(self, q_start: int, total: int) -> tuple[int, int]:
        raise NotImplementedError("infllm reads its memory from its own cache; an engine cannot gather its keys.")

    def cache_layer(self, left_pad: int = 0) -> BlockMemoryLayer:
        if left_pad:
            raise ValueError(PADDING)
        return BlockMemoryLayer(self.n_global, self.n_local, self.block_size, self.hot_blocks, self.memory_dir)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
        if not bool(layout.k_valid.all()):
            raise ValueError(PADDING)
        memory = call.memory if isinstance(call.memory, BlockMemoryLayer) else None
        if memory is None:  # no cache of its own: only a call that holds every token from the first can run
            if k.shape[-2] != q.shape[-2] or int(layout.q_pos.min()) != 0:
                raise ValueError(
                    "strategy infllm keeps its memory in its own cache: pass lminf.make_cache(model) "
                    "to every forward call (model.generate does), or the whole input in one call."
                )
            memory = self.cache_layer()
            memory.update(k, v)
        return block_memory_attention(q, k, v, layout, memory, call, self)

    def rule(self, i: torch.Tensor, j: torch.Tensor, layer: int) -> Rule:
        window = super().rule(i, j, layer)  # local pairs, and the first tokens capped
        local = i - j < self.n_local
        middle = ~local & (j >= self.n_global)
        in_memory = (i - (self.n_global + self.n_local - 1)).div(self.block_size, rounding_mode="floor").clamp(min=0)
        block = (j - self.n_global).div(self.block_size, rounding_mode="floor")
        available = middle & (block < in_memory)
        return Rule(
            seen=window.seen | (middle & ~available),  # the edge: out of the window, not yet in a memory block
            distance=torch.where(local, i - j, self.n_local),
            candidates=torch.zeros_like(local),
            block=torch.where(available, block, -1),
            top_blocks=self.top_blocks,
            repr_topk=self.repr_topk,
            scored=local,
        )

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        """Closed form of Strategy.kept_pairs (tested against it)."""
        pairs = super().kept_pairs(length, 0)  # window and first tokens
        p = torch.arange(length)
        out = (p - self.n_local - self.n_global + 1).clamp(min=0)  # middle tokens out of the window
        in_memory = (p - (self.n_global + self.n_local - 1)).div(self.block_size, rounding_mode="floor").clamp(min=0)
        edge = out - in_memory * self.block_size
        return pairs + int((edge + in_memory.clamp(max=self.top_blocks) * self.block_size).sum())

    @property
    def keeps_middle(self) -> bool:
        return False
