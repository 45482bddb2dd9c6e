"""LongHeads (Lu et al., 2024, arXiv 2402.10685; official code LuLuLuyi/LongHeads): each query
head reads its own chunks of the text, as many as fit in the attention length, laid out side
by side so that no rotary distance reaches it.

The text is cut into chunks of `chunk_tokens` tokens from position 0. A finished chunk gets,
per query head, a summary key, computed as the official code does: the chunk's queries and
keys, rotated at their positions inside the chunk, attend to each other (no causal mask), the
outputs are averaged into one vector s, and the summary key is the chunk's keys (rotated the
same way) weighted by softmax(s . k / sqrt(head_dim)). With K = attention_length / chunk_tokens,
a query at position p in chunk c reads, from `select_from` on:

    encoding (a call of several tokens): chunk 0, chunk c - 1, the K - 3 chunks of 1..c-2
        whose summary keys score best against the query before rotation, and chunk c up to
        the token before it (the official code leaves a query's own key out in this phase);
    decoding (a call of one token): the same with its own key; when it is the last token of
        chunk c, chunk c is the last finished one and the K - 3 come from 1..c-1 (K - 1
        chunks in all, as the official code reads).

The chunks read are laid out contiguously in their order: a key sits at the number of keys
the head reads before it, and the query after the keys before it, so every distance is below
the attention length. Queries before `select_from` attend causally at true distances.

Where the official code (Llama, multi-head) is silent, lminf chooses: the chunk's own attention
uses the layer's scaling and soft-capping; each query head of a group selects for itself and
reads its group's keys; ALiBi models are refused (their distances are not rotations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from lminf.caches.lambda_cache import LambdaLayer
from lminf.caches.rows import RowState
from lminf.families import FAMILIES, training_length
from lminf.kernels.sdpa import attend, softcapped, use_flash, wide
from lminf.layout import Layout
from lminf.rope import rotate, rotation
from lminf.strategies.base import AttentionCall, Rule, Strategy, register

PADDING = "strategy longheads does not support padded batches: run rows of different lengths one at a time."
DEFAULT_ATTENTION_LENGTH = 4096  # the official default, capped at the model's training length


@register
@dataclass(frozen=True)
class LongHeads(Strategy):
    """Every query head reads its own `attention_length // chunk_tokens` chunks (see the module
    docstring). The cache keeps every key and value, a summary key per chunk and query head,
    and the queries of the chunk not yet finished."""

    name = "longheads"
    stateful = True
    pads = False
    same_across_calls = False  # a call of one token reads its own key, a longer call does not

    n_global: int = field(default=0, metadata={"help": "first tokens every query sees"})  # unused: chunk 0 is always read
    chunk_tokens: int = field(default=256, metadata={"help": "tokens per chunk (longheads)"})
    attention_length: int | None = field(
        default=None,
        metadata={"help": "keys each query head reads, whole chunks (longheads; default min(4096, training length))"},
    )
    select_from: int | None = field(
        default=None, metadata={"help": "first position whose query selects chunks (longheads; default attention_length)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}.")
        if self.attention_length is not None:
            self._check()

    def _check(self) -> None:
        w, length = self.chunk_tokens, self.attention_length
        if length % w or length < 3 * w:
            raise ValueError(f"attention_length ({length}) must be a multiple of chunk_tokens ({w}), at least 3 chunks.")
        start = length if self.select_from is None else self.select_from
        if start % w or start < length - w:
            raise ValueError(
                f"select_from ({start}) must be a multiple of chunk_tokens ({w}) and >= attention_length - chunk_tokens "
                f"({length - w}): a selecting query needs that many chunks behind it."
            )

    def resolve(self, config: PretrainedConfig) -> LongHeads:
        if FAMILIES[config.model_type].alibi:
            raise ValueError(f"strategy longheads lays chunks out by rotary positions; {config.model_type} uses ALiBi.")
        trained = training_length(config)
        length = self.attention_length or max(
            3 * self.chunk_tokens, min(DEFAULT_ATTENTION_LENGTH, trained) // self.chunk_tokens * self.chunk_tokens
        )
        if length > trained:
            raise ValueError(f"attention_length ({length}) must not exceed the model's training length ({trained}).")
        resolved = dataclasses.replace(self, attention_length=length, select_from=self.select_from or length)
        resolved._check()
        return resolved

    def pinned(self, n_global: int) -> LongHeads:
        return self  # chunk 0 is always read: a pinned prefix within it is seen by every query

    def cache_layer(self, left_pad: int = 0) -> ChunkMemory:
        if left_pad:
            raise ValueError(PADDING)
        return ChunkMemory(self.chunk_tokens)

    def keys_for(self, q_start: int, total: int) -> tuple[int, int]:
        raise NotImplementedError("longheads reads chunk summaries from its own cache; an engine cannot gather its keys.")

    def plain_up_to(self) -> int:
        return (self.select_from or 1) - 1  # a decoding step selects from select_from - 1 on

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
        if not bool(layout.k_valid.all()):
            raise ValueError(PADDING)
        if call.alibi is not None:
            raise ValueError("strategy longheads lays chunks out by rotary positions; this layer uses ALiBi.")
        p0, total = int(layout.q_pos[0, 0]), int(layout.q_pos[0, -1]) + 1
        memory = call.memory if isinstance(call.memory, ChunkMemory) else None
        if memory is None:  # no cache of its own: only a call that holds every token from the first can run
            if p0 != 0:
                raise ValueError(
                    "strategy longheads keeps chunk summaries in its own cache: pass lminf.make_cache(model) "
                    "to every forward call (model.generate does), or the whole input in one call."
                )
            memory = self.cache_layer()
        if k.shape[-2] != total:
            raise ValueError(f"longheads reads every key: got {k.shape[-2]} keys for {total} positions.")
        memory.summarise(q, k, v, p0, call)
        decoding = q.shape[-2] == 1
        out = torch.empty_like(q)
        plain_end = min(total, max(p0, self.select_from - (1 if decoding else 0)))
        if plain_end > p0:
            out[..., : plain_end - p0, :] = _causal(
                q[..., : plain_end - p0, :], k[..., :plain_end, :], v[..., :plain_end, :], call
            )
        a, w = plain_end, self.chunk_tokens
        while a < total:  # queries in groups that share their chunk
            b = min(total, (a // w + 1) * w)
            out[..., a - p0 : b - p0, :] = self._chunked(q[..., a - p0 : b - p0, :], k, v, a, memory, call, decoding)
            a = b
        return out

    def _chunked(self, q, k, v, start: int, memory: ChunkMemory, call: AttentionCall, decoding: bool) -> torch.Tensor:
        """Queries at positions start.. (one chunk, c) reading their chosen chunks and their own."""
        B, Hq, G, D = q.shape
        w, rep = self.chunk_tokens, Hq // k.shape[1]
        c, positions = start // w, torch.arange(start, start + G, device=q.device)
        chunks = self.choose(_rotated(q, -positions, call), memory.summaries, c, decoding and (start + 1) % w == 0)
        R = chunks.shape[-1]
        # A key at offset o of the chunk at rank r sits at r*w + o, the query at R*w + its offset: placed
        # this far from its true position, the query meets the key (at its true one) at that distance.
        shift = (chunks + R - torch.arange(R, device=q.device) - c) * w
        placed = _rotated(q[:, :, :, None].expand(B, Hq, G, R, D).reshape(B, Hq, G * R, D), shift.reshape(B, Hq, G * R), call)
        own_end = start + G if decoding else start + G - 1  # the official encoding leaves a query's own key out
        own = torch.arange(c * w, max(own_end, c * w), device=q.device)
        k_own, v_own = k[:, :, own].repeat_interleave(rep, 1), v[:, :, own].repeat_interleave(rep, 1)
        seen_own = own[None, :] <= (positions if decoding else positions - 1)[:, None]
        keys = k[:, :, : c * w].unflatten(2, (c, w))
        values = v[:, :, : c * w].unflatten(2, (c, w))
        key_head = torch.arange(Hq * G * R, device=q.device) // (G * R) // rep  # rows are (query head, query, rank)
        out = torch.empty_like(q)
        for b in range(B):
            segments = _Segments(chunks[b].reshape(-1), key_head, keys.shape[1], c)
            logits = segments.times(placed[b].reshape(Hq * G * R, D), keys[b], transposed=True)
            logits = torch.cat((logits.view(Hq, G, R * w), q[b] @ k_own[b].transpose(-1, -2)), -1)
            logits = softcapped(wide(logits) * call.scaling, call.softcap)
            seen = torch.cat((torch.ones(G, R * w, dtype=torch.bool, device=q.device), seen_own), -1)
            probs = torch.softmax(logits.masked_fill(~seen, -torch.inf), -1)
            read = segments.times(probs[..., : R * w].reshape(Hq * G * R, w), values[b], transposed=False)
            read = read.view(Hq, G, R, D).sum(2)  # over the chunks each query head read
            out[b] = (read + probs[..., R * w :] @ v_own[b].to(probs.dtype)).to(q.dtype)
        return out

    def choose(self, unrotated: torch.Tensor, summaries: torch.Tensor, c: int, closes_chunk: bool) -> torch.Tensor:
        """The finished chunks that queries of chunk c (B, Hq, G, D, before rotation) read, in order,
        per query head -> (B, Hq, G, R): chunk 0, the best by summary key, and chunk c - 1 unless
        `closes_chunk` (a decoding step on the last token of chunk c, which then stands for it)."""
        last_candidate = c - 1 if closes_chunk else c - 2
        scores = torch.einsum("bhgd,bhcd->bhgc", unrotated, summaries[:, :, 1 : last_candidate + 1].to(unrotated.dtype))
        top = scores.topk(self.attention_length // self.chunk_tokens - 3, dim=-1).indices.sort(-1).values + 1
        first, previous = torch.zeros_like(top[..., :1]), torch.full_like(top[..., :1], c - 1)
        return torch.cat((first, top) if closes_chunk else (first, top, previous), -1)

    def rule(self, i: torch.Tensor, j: torch.Tensor, layer: int) -> Rule:
        w = self.chunk_tokens
        decoding = i.shape[1] == 1
        c, cj = i.div(w, rounding_mode="floor"), j.div(w, rounding_mode="floor")
        selects = i >= self.select_from - (1 if decoding else 0)
        previous_forced = ~((i + 1) % w == 0) if decoding else torch.ones_like(i, dtype=torch.bool)
        own = (cj == c) & ((j <= i) if decoding else (j < i))
        forced = (cj == 0) | ((cj == c - 1) & previous_forced) | own
        candidates = (cj >= 1) & (cj <= c - 1 - previous_forced.long())
        return Rule(
            seen=torch.where(selects, forced, j <= i),
            distance=(i - j).expand_as(forced),
            candidates=torch.zeros_like(forced),
            chunk_tokens=w,
            top_chunks=self.attention_length // w - 3,
            chunk_candidates=selects & candidates,
        )


def _rotated(x: torch.Tensor, delta: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """x (B, H, N, D) turned by `delta` positions, (N,) or (B, H, N); as it is in a layer without rotary."""
    if call.inv_freq is None:
        return x
    B, H, N, D = x.shape
    delta = delta.expand(B, H, N).reshape(B * H, N)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos_sin = rotation(delta, call.inv_freq, call.interleaved, dtype)
    return rotate(x.reshape(B * H, 1, N, D), cos_sin, call.interleaved).view(B, H, N, D)


class _Segments:
    """Rows that each read one chunk of one key head, sorted so that the rows reading the same
    (key head, chunk) are contiguous: each chunk is then read once, by one matmul, for all of them."""

    def __init__(self, chunks: torch.Tensor, key_head: torch.Tensor, n_heads: int, n_chunks: int):
        group = key_head * n_chunks + chunks
        self.order = group.argsort(stable=True)
        self.back = self.order.argsort()
        self.spans, start = [], 0
        for g, n in enumerate(torch.bincount(group, minlength=n_heads * n_chunks).tolist()):
            if n:
                self.spans.append((start, start + n, g // n_chunks, g % n_chunks))
                start += n

    def times(self, rows: torch.Tensor, per_chunk: torch.Tensor, transposed: bool) -> torch.Tensor:
        """Each row (N, X) times its chunk's matrix (per_chunk[head, chunk], (w, X) or (w, Y)):
        rows @ m.T if `transposed` else rows @ m -> (N, w or Y), in the rows' order."""
        rows = rows[self.order]
        out = rows.new_empty(len(rows), per_chunk.shape[-2] if transposed else per_chunk.shape[-1])
        for start, end, head, chunk in self.spans:
            m = per_chunk[head, chunk].to(rows.dtype)
            out[start:end] = rows[start:end] @ (m.T if transposed else m)
        return out[self.back]


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The last q.shape[-2] positions of k attending causally to every key at its true distance."""
    n, total, rep = q.shape[-2], k.shape[-2], q.shape[1] // k.shape[1]
    mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)[None, None]
    flash = use_flash(call.kernel, q.device)
    o, _ = attend(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask, call.scaling, flash, softcap=call.softcap)
    return o.to(q.dtype)


class ChunkMemory(RowState, LambdaLayer):
    """One layer's cache for LongHeads: every key and value (a LambdaLayer that drops nothing),
    the summary key of every finished chunk per query head (B, Hq, chunks, D), and the queries
    of the unfinished chunk, which its summary will need."""

    row_state = ("summaries", "queries")

    def __init__(self, chunk_tokens: int):
        super().__init__(n_global=0, n_local=None)
        self.chunk_tokens = chunk_tokens
        self.summaries: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None  # positions [finished * chunk_tokens, seen), rotated at them

    def summarise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, call: AttentionCall) -> None:
        """Add the summaries of the chunks that queries [p0, p0 + Q) finish; keep the rest's queries."""
        w = self.chunk_tokens
        done = 0 if self.summaries is None else self.summaries.shape[2]
        kept = q[..., :0, :] if self.queries is None else self.queries
        queries = torch.cat((kept, q), -2)  # positions [done * w, p0 + Q)
        if done * w + queries.shape[-2] != p0 + q.shape[-2]:
            raise ValueError("longheads: this cache saw another sequence of calls; use one cache per sequence.")
        finished = (p0 + q.shape[-2]) // w
        if finished > done:
            span = slice(done * w, finished * w)
            new = _summaries(queries[..., : (finished - done) * w, :], k[..., span, :], v[..., span, :], done * w, w, call)
            self.summaries = new if self.summaries is None else torch.cat((self.summaries, new), 2)
        self.queries = queries[..., (finished - done) * w :, :]

    def nbytes(self) -> int:
        extra = [t for t in (self.summaries, self.queries) if t is not None]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in extra)

    def reset(self) -> None:
        super().reset()
        self.summaries = self.queries = None


def _summaries(q, k, v, start: int, w: int, call: AttentionCall) -> torch.Tensor:
    """Summary keys (B, Hq, n, D) of the n chunks whose queries q (B, Hq, n*w, D), keys and
    values (B, Hkv, n*w, D) start at position `start` (a multiple of w)."""
    B, Hq, N, D = q.shape
    rep, n = Hq // k.shape[1], N // w
    to_local = -(torch.arange(start, start + N, device=q.device).div(w, rounding_mode="floor") * w)
    q_local = _rotated(q, to_local, call).unflatten(2, (n, w))
    k_local = _rotated(k, to_local, call).repeat_interleave(rep, 1).unflatten(2, (n, w))
    v = v.repeat_interleave(rep, 1).unflatten(2, (n, w))
    inside = torch.softmax(softcapped(wide(q_local @ k_local.transpose(-1, -2)) * call.scaling, call.softcap), -1)
    s = (inside.to(v.dtype) @ v).mean(-2, keepdim=True)  # (B, Hq, n, 1, D): the chunk's mean attention output
    pool = torch.softmax(wide(s @ k_local.transpose(-1, -2)) * D**-0.5, -1)
    return (pool.to(k_local.dtype) @ k_local).squeeze(-2)
