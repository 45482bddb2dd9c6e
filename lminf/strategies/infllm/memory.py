"""The cache of a block-memory strategy (InfLLM): a bounded window on the compute device,
and the text that left it, in blocks, in host memory.

Per layer it keeps:
- the first `n_global` tokens and the recent tokens not yet cut into blocks (the window and
  the block it is leaving), as the model rotated them, on the compute device;
- `mass`: for each recent token and query head, the attention it has received so far from
  the queries that see it in their window (InfLLM's score for choosing a block's
  representative keys);
- the memory: every block that left the window, its keys placed at position 0 (unrotated),
  in a `BlockStore` (host tier, optionally a memory-mapped file, and a small LRU cache of
  hot blocks on the compute device), and one representative vector per block and query
  head (`reps`, on the compute device: the mean of its keys that received most attention).

The attention (attention.py) forms blocks and asks for the ones it retrieves;
the cache only stores. Device memory is bounded by n_global + recent (< window + 2 blocks) +
hot blocks, whatever the length; host memory grows with the input, and the cache reports
both (`device_bytes`, `host_bytes`), and the representatives apart (`index_bytes`).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import torch
from transformers.cache_utils import DynamicLayer

CHUNK_BLOCKS = 64  # blocks per host allocation (a file each when memory-mapped)


class BlockStore:
    """Blocks of keys and values, (2, B, Hkv, block, D) each: every one in host memory (a file
    when `directory` is given), the most recently used `hot` ones also on the compute device,
    side by side in one tensor that attention reads whole under a mask (no gather copy)."""

    def __init__(self, hot: int, directory: str = ""):
        if hot < 1:
            raise ValueError(f"the hot-block cache needs room for at least one block, got {hot}.")
        self.hot, self.directory = hot, directory
        self.chunks: list[torch.Tensor] = []  # host: (CHUNK_BLOCKS, 2, B, Hkv, block, D) each
        self.count = 0
        self.slots: torch.Tensor | None = None  # device: (2, B, Hkv, hot * block, D), slot s at [s * block, (s + 1) * block)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # block -> slot, least recently used first
        self.block_in: list[int] = [-1] * hot  # slot -> block (-1: empty)
        self.hits = 0  # reads served by the hot cache

    def add(self, kv: torch.Tensor) -> None:
        """Store one block (2, B, Hkv, block, D) in the host tier."""
        if self.count % CHUNK_BLOCKS == 0:
            self.chunks.append(self._host_chunk(kv))
        self.chunks[-1][self.count % CHUNK_BLOCKS].copy_(kv, non_blocking=True)
        self.count += 1

    def _host_chunk(self, kv: torch.Tensor) -> torch.Tensor:
        shape = (CHUNK_BLOCKS, *kv.shape)
        if not self.directory:
            return torch.empty(shape, dtype=kv.dtype, pin_memory=kv.is_cuda)
        os.makedirs(self.directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="lminf-blocks-", dir=self.directory)
        os.close(fd)
        try:  # the mapping outlives the name: the file goes when the cache does
            size = torch.Size(shape).numel()
            return torch.from_file(path, shared=True, size=size, dtype=kv.dtype).view(shape)
        finally:
            os.unlink(path)

    def host(self, block: int) -> torch.Tensor:
        return self.chunks[block // CHUNK_BLOCKS][block % CHUNK_BLOCKS]

    def load(self, blocks: list[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Make `blocks` (at most `hot` of them) hot, loading the missing ones from the host tier
        over the least recently used others -> (keys, values) of every slot, (B, Hkv, hot * block, D)
        each, and which block each slot holds, (hot,) long (-1: empty; its keys are zeros)."""
        if len(blocks) > self.hot:
            raise ValueError(f"asked for {len(blocks)} blocks at once, the hot cache holds {self.hot}.")
        _, B, H, n, D = self.host(0).shape
        if self.slots is None:
            self.slots = torch.zeros((2, B, H, self.hot * n, D), dtype=like.dtype, device=like.device)
        wanted = set(blocks)
        for block in blocks:
            if block in self.slot_of:
                self.hits += 1
                self.slot_of.move_to_end(block)
                continue
            if len(self.slot_of) < self.hot:
                slot = len(self.slot_of)
            else:
                victim = next(b for b in self.slot_of if b not in wanted)
                slot = self.slot_of.pop(victim)
            self.slots[:, :, :, slot * n : (slot + 1) * n].copy_(self.host(block), non_blocking=True)
            self.slot_of[block], self.block_in[slot] = slot, block
        return self.slots[0], self.slots[1], torch.tensor(self.block_in, device=like.device)

    def host_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def device_bytes(self) -> int:
        return 0 if self.slots is None else self.slots.numel() * self.slots.element_size()


class BlockMemoryLayer(DynamicLayer):
    """One layer's cache for a block-memory strategy; see the module docstring.

    Stored keys are [first n_global tokens | recent tokens from position `recent_start`], in
    order, in room that grows geometrically; the attention drops recent tokens as it cuts
    them into blocks (`drop_recent`), so a decoding step copies one token, not the window.
    """

    is_croppable = False
    is_sliding = False

    def __init__(self, n_global: int, n_local: int, block_size: int, hot_blocks: int, directory: str = ""):
        super().__init__()
        self.n_global, self.n_local, self.block_size = n_global, n_local, block_size
        # Between calls at most the window and the block leaving it are recent (plus the next token).
        self.bound = n_global + n_local + block_size
        self.cumulative_length = 0
        self.recent_start = n_global  # position of the first recent token
        self.store = BlockStore(hot_blocks, directory)
        self.reps: torch.Tensor | None = None  # (B, Hq, room, D); the first n_blocks are real
        self.mass: torch.Tensor | None = None  # (B, Hq, room) for the recent tokens, in order
        self.key_room = self.value_room = None

    @property
    def n_blocks(self) -> int:
        return self.store.count

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stored, n = self.keys.shape[-2], key_states.shape[-2]
        if self.key_room is None or self.key_room.shape[:-2] != key_states.shape[:-2] or self.key_room.shape[-2] < stored + n:
            size = max(stored + n, min(stored + n + (stored + n) // 4 + 256, self.bound))  # amortised O(1) per token
            self.key_room = _grown(self.keys, key_states, size)
            self.value_room = _grown(self.values, value_states, size)
        self.key_room[..., stored : stored + n, :] = key_states
        self.value_room[..., stored : stored + n, :] = value_states
        self.keys, self.values = self.key_room[..., : stored + n, :], self.value_room[..., : stored + n, :]
        self.cumulative_length += n
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[-2] if self.is_initialized else 0
        total = self.cumulative_length + query_length
        if total <= self.n_global:
            return total, total
        return stored + query_length, self.recent_start

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def n_stored_global(self) -> int:
        return min(self.n_global, self.cumulative_length)

    def masses(self, n_heads: int) -> torch.Tensor:
        """(B, Hq, recent tokens) attention received so far; zeros for tokens not yet scored."""
        recent = self.keys.shape[-2] - self.n_stored_global()
        B = self.keys.shape[0]
        if self.mass is None or self.mass.shape[-1] < recent or self.mass.shape[:2] != (B, n_heads):
            dtype = torch.float64 if self.keys.dtype == torch.float64 else torch.float32
            room = torch.zeros(B, n_heads, recent + recent // 4 + 256, dtype=dtype, device=self.keys.device)
            if self.mass is not None and self.mass.shape[:2] == (B, n_heads):
                room[..., : self.mass.shape[-1]] = self.mass
            self.mass = room
        return self.mass[..., :recent]

    def add_block(self, kv: torch.Tensor, rep: torch.Tensor) -> None:
        """Store a block (2, B, Hkv, block, D), keys placed at position 0, and its representatives (B, Hq, D)."""
        self.store.add(kv)
        n = self.store.count
        if self.reps is None or self.reps.shape[2] < n:
            room = rep.new_empty(rep.shape[0], rep.shape[1], 2 * n + 16, rep.shape[2])
            if self.reps is not None:
                room[:, :, : n - 1] = self.reps[:, :, : n - 1]
            self.reps = room
        self.reps[:, :, n - 1] = rep

    def drop_recent(self, to_position: int) -> None:
        """Forget the recent tokens before `to_position` (they are in blocks now)."""
        drop = to_position - self.recent_start
        if drop <= 0:
            return
        s, stored = self.n_stored_global(), self.keys.shape[-2]
        kept = stored - s - drop
        if self.key_room.shape[-2] > self.bound:  # a long call grew the room: back to the bound
            self.key_room, self.value_room = (_grown(x[..., :s, :], x, self.bound) for x in (self.keys, self.values))
        for room, old in ((self.key_room, self.keys), (self.value_room, self.values)):
            room[..., s : s + kept, :] = old[..., s + drop : stored, :].clone()
        self.keys, self.values = self.key_room[..., : s + kept, :], self.value_room[..., : s + kept, :]
        if self.mass is not None:
            self.mass[..., :kept] = self.mass[..., drop : drop + kept].clone()
            self.mass[..., kept:] = 0
        self.recent_start = to_position

    def device_bytes(self) -> int:
        """Keys and values on the compute device: first tokens, recent tokens (spare room
        included) and the hot blocks."""
        rooms = [r for r in (self.key_room, self.value_room) if r is not None]
        return sum(r.numel() * r.element_size() for r in rooms) + self.store.device_bytes()

    nbytes = device_bytes  # what LambdaCache.memory_bytes sums

    def host_bytes(self) -> int:
        return self.store.host_bytes()

    def index_bytes(self) -> int:
        """The representatives and masses (on the compute device; they grow by Hq x D per block)."""
        return sum(t.numel() * t.element_size() for t in (self.reps, self.mass) if t is not None)

    def reset(self) -> None:
        self.__init__(self.n_global, self.n_local, self.block_size, self.store.hot, self.store.directory)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a block-memory cache cannot be cropped (assisted decoding is not supported).")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None and not torch.equal(indices.cpu(), torch.arange(self.keys.shape[0])):
            raise NotImplementedError("infllm's block memory cannot reorder its batch (beam search); use greedy or sampling.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None and repeats != 1:
            raise NotImplementedError("infllm's block memory cannot repeat its batch (beam search); use greedy or sampling.")


def _grown(old: torch.Tensor, new: torch.Tensor, size: int) -> torch.Tensor:
    room = new.new_empty((*new.shape[:-2], size, new.shape[-1]))
    if old.shape[-2]:
        room[..., : old.shape[-2], :] = old
    return room
