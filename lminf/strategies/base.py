"""The seam every training-free long-context strategy plugs into.

A `Strategy` is a frozen dataclass of settings that decides, for one attention layer,
which keys each query sees and at which rotary distance (`attention`, the fast path over
(q, k, v, Layout)), the cache layer that must hold those keys (`cache_layer`), and the same
decision written densely for the tests' float64 reference (`rule`). A strategy file
registers its class with `@register`; `lminf.strategies` imports every file of the
package, so a new strategy is one file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import CacheLayerMixin

from lminf.layout import Layout

STRATEGIES: dict[str, type[Strategy]] = {}


@dataclass(frozen=True)
class Rule:
    """Which keys a query at position i sees of keys at positions j <= i, densely (B, Q, K).
    The tests' reference computes attention from this alone; padding and j > i are its business."""

    seen: torch.Tensor  # bool: pairs always attended
    distance: torch.Tensor  # long: the rotary distance each pair is scored at (its logit's position gap)
    candidates: torch.Tensor  # bool: pairs from which each query head adds its `top_k` best (by that logit)
    top_k: int = 0
    top_k_all_or_none: bool = False  # a query with fewer than top_k candidates picks none
    # A block memory (InfLLM): the block of a key that is in the query's memory, -1 for none (long);
    # the query sees the `top_blocks` blocks whose representative vectors score best (all while
    # there are no more). A block's representative per query head is the mean of its
    # `repr_topk` keys that received the most attention from the `scored` pairs (bool) before it.
    block: torch.Tensor | None = None
    top_blocks: int = 0
    repr_topk: int = 0
    scored: torch.Tensor | None = None
    # Chunks chosen per query head (LongHeads): keys in chunks of `chunk_tokens` from position 0; a
    # query head adds the `top_chunks` chunks among `chunk_candidates` (bool pairs) whose summary
    # keys score best against its query before rotation (a chunk's summary key per query head: its
    # queries and keys, rotated at their offsets in the chunk, attend to each other without a
    # causal mask; the mean output s weights the chunk's keys, so rotated, by softmax(s . k /
    # sqrt(head_dim))), and the keys the head then sees are laid out contiguously: a pair's
    # distance is the number of seen keys from the key up to the query, the query's own excluded.
    chunk_tokens: int = 0
    top_chunks: int = 0
    chunk_candidates: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionCall:
    """What one layer's attention call knows besides q, k, v and the Layout."""

    layer: int
    inv_freq: torch.Tensor | None  # the layer's rotary frequencies (move with the model); None: a NoPE layer
    scaling: float
    kernel: str = "auto"  # lminf.kernels.sdpa.KERNELS
    softcap: float | None = None  # the model's attention logit soft-capping (Gemma 2)
    interleaved: bool = False  # rotary pairs (2f, 2f + 1) as in GPT-J, not (f, f + rot/2)
    alibi: torch.Tensor | None = None  # ALiBi slopes per query head (MPT), for a layer without rotary positions
    memory: object | None = None  # a `stateful` strategy's cache layer in this call (another cache's, or None: no cache)


@dataclass(frozen=True)
class Strategy:
    """Base class: subclasses add their settings as fields and implement the methods below."""

    name: ClassVar[str] = ""
    # The evaluation methods a strategy offers: method name -> settings fixed for it (the
    # rest come from the command line). Default: one method named after the strategy.
    presets: ClassVar[dict[str, dict]] = {}
    # True: its attention keeps state in its own cache layer (`AttentionCall.memory`), so it runs
    # only through lminf's cache, not from keys an engine gathers (vLLM). False: a pure function of q, k, v.
    stateful: ClassVar[bool] = False
    pads: ClassVar[bool] = True  # False: a padded batch is refused (with a clear error)
    # False: the output depends on how the input is split into forward calls (the original top-k
    # rule: the last query of each call picks), so decoding does not equal one forward.
    same_across_calls: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = False  # True: its cache takes every token's score from the logits (SirLLM)

    # First tokens every query sees; a chat pins its system prompt here (`pinned`). The help
    # text of each setting is its command-line help (lminf.arguments makes one flag per setting).
    n_global: int = field(default=10, metadata={"help": "first tokens every query sees"})

    def __post_init__(self) -> None:
        if self.n_global < 0:
            raise ValueError(f"n_global must be >= 0, got {self.n_global}.")

    def resolve(self, config: PretrainedConfig) -> Strategy:
        """This strategy with the defaults that depend on the model filled in, checked against it."""
        return self

    def pinned(self, n_global: int) -> Strategy:
        """The same strategy with `n_global` first tokens pinned (a forward call's `lminf_n_global`)."""
        return self if n_global == self.n_global else dataclasses.replace(self, n_global=n_global)

    def cache_layer(self, left_pad: int = 0) -> CacheLayerMixin:
        """One layer of the cache this strategy's attention reads; `left_pad`: the batch's left
        padding, kept with the first tokens. lminf.make_cache puts one per layer in a `LambdaCache`."""
        raise NotImplementedError

    def cache_bound(self) -> int | None:
        """The most tokens per layer its cache holds on the compute device (padding aside); None:
        every token, so memory grows with the input. A promise the tests hold `lminf.make_cache` to.
        (A block memory also keeps every block in host memory, which grows: InfLLM.)"""
        return None

    def keys_for(self, q_start: int, total: int) -> tuple[int, int]:
        """Which keys the attention of queries at positions [q_start, total) reads, for an engine
        that gathers them from its own cache (vLLM's paged blocks): (first_end, tail_start), the
        positions [0, first_end) and [tail_start, total), first_end <= tail_start. Default: all."""
        return 0, 0

    def plain_up_to(self) -> int:
        """The longest input (in tokens) over which this strategy is plain causal attention: every
        query sees every earlier key at its true distance. An engine may run its own attention
        kernel up to it (vLLM's, for batches that fit). Default: 0, never claimed."""
        return 0

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
        """q (B, Hq, Q, D), k and v (B, Hkv, K, D), rotated at their own positions -> (B, Hq, Q, D)."""
        raise NotImplementedError

    def rule(self, i: torch.Tensor, j: torch.Tensor, layer: int) -> Rule:
        """The attention rule for query positions i (B, Q, 1) and key positions j (B, 1, K)."""
        raise NotImplementedError

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        """Query-key pairs one layer attends to over a causal prompt of `length` tokens (the
        benchmark's FLOP floor), counted from `rule` in blocks of queries."""
        total, j = 0, torch.arange(length)[None, None, :]
        edges = [*range(0, length, 512), length]
        if len(edges) > 2 and edges[-1] - edges[-2] == 1:  # a block of one query would read as a decoding step
            del edges[-2]
        for a, b in zip(edges, edges[1:], strict=False):
            i = torch.arange(a, b)[None, :, None]
            rule, causal = self.rule(i, j, layer), j <= i
            total += int((rule.seen & causal).sum())
            picks = (rule.candidates & ~rule.seen & causal).sum(-1)
            if rule.top_k_all_or_none:
                picks = torch.where(picks >= rule.top_k, picks, 0)
            total += int(picks.clamp(max=rule.top_k).sum())
            if rule.block is not None:  # equal blocks: min(top_blocks, blocks) of them
                n_blocks, keys = rule.block.max(-1).values + 1, ((rule.block >= 0) & causal).sum(-1)
                total += int((keys * n_blocks.clamp(max=rule.top_blocks) // n_blocks.clamp(min=1)).sum())
            if rule.chunk_candidates is not None:  # whole chunks: min(top_chunks, candidates) of them
                n_chunks = (rule.chunk_candidates & causal).sum(-1) // rule.chunk_tokens
                total += int((n_chunks.clamp(max=rule.top_chunks) * rule.chunk_tokens).sum())
        return total

    def settings(self) -> dict:
        """JSON-ready: the strategy's name and every setting."""
        return {"strategy": self.name, **dataclasses.asdict(self)}

    @classmethod
    def methods(cls) -> dict[str, dict]:
        return cls.presets or {cls.name: {}}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy known by its `name` to patch, the CLI, eval, bench and report."""
    if not cls.name or STRATEGIES.get(cls.name, cls) is not cls:
        raise ValueError(f"a strategy needs a unique name; {cls.__name__} has {cls.name!r}.")
    STRATEGIES[cls.name] = cls
    return cls


def get(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}.")
    return STRATEGIES[name]


def build(strategy: Strategy | str, **settings) -> Strategy:
    """A strategy from a registered name and settings, or a given one with settings replaced."""
    cls = type(strategy) if isinstance(strategy, Strategy) else get(strategy)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"strategy {cls.name!r} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known))}.")
    return dataclasses.replace(strategy, **settings) if isinstance(strategy, Strategy) else cls(**settings)
