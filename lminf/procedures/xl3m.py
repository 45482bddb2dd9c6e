"""XL3M (Wang et al. 2024, arXiv 2405.17755): answer from a few segments the model is certain about.

The input is a context followed by a "question" (its last tokens, or one given apart). The
context is cut into overlapping segments; each sub-context [segment | question] goes through
the plain model once, and the mean entropy of the model's next-token distributions at the
question's positions says how certain the model is about the question given that segment
(lower: more certain, more relevant). The most certain segments that fit the window are
spliced in their original order, de-overlapped, and followed by the question; the model
answers greedily from that key context. m segments cost m + 1 model calls, none longer than
the window, and one window of KV. The details the paper leaves open, and what lminf chose,
are in docs/strategies.md (XL3M).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from lminf.families import training_length
from lminf.generation import greedy
from lminf.patching import state_of

Span = tuple[int, int]  # [start, end) in the context


@dataclass(frozen=True)
class Selection:
    """What XL3M chose for one input: every segment's span in the context and its question
    entropy (None when the whole context fit and nothing was scored), the chosen segments'
    indices in order, and the key context the model answers from (1, n)."""

    spans: list[Span]
    entropies: list[float] | None
    chosen: list[int]
    key_ids: torch.Tensor

    def summary(self) -> dict:
        """The selection as JSON values (what an evaluation records beside its answer)."""
        return {
            "segments": len(self.spans),
            "chosen_spans": [list(self.spans[i]) for i in self.chosen],
            "chosen_entropies": None if self.entropies is None else [round(self.entropies[i], 4) for i in self.chosen],
            "key_tokens": self.key_ids.shape[1],
        }


@dataclass(frozen=True)
class XL3M:
    """XL3M's settings; None means a default that depends on the model (`resolved`)."""

    segment_tokens: int | None = None  # tokens per segment; default window // 8
    overlap: int | None = None  # tokens two neighbouring segments share; default segment_tokens // 8
    question_tokens: int = 16  # the question is the input's last tokens, unless one is given apart
    window: int | None = None  # the longest input the model reads; default its training length
    max_segments: int | None = None  # keep at most this many segments; None: as many as the window holds
    batch_size: int = 4  # sub-contexts per model call

    name = "xl3m"

    def settings(self) -> dict:
        return {"procedure": self.name, **dataclasses.asdict(self)}

    def resolved(self, config: PretrainedConfig) -> XL3M:
        """These settings with the model's defaults filled in, checked."""
        window = self.window or training_length(config)
        segment = self.segment_tokens or max(1, window // 8)
        overlap = segment // 8 if self.overlap is None else self.overlap
        if not 0 <= overlap < segment:
            raise ValueError(f"xl3m overlap must be in 0..{segment - 1} (segment_tokens {segment}), got {overlap}.")
        if self.question_tokens < 1 or self.batch_size < 1 or (self.max_segments is not None and self.max_segments < 1):
            raise ValueError("xl3m question_tokens, batch_size and max_segments must be >= 1.")
        return dataclasses.replace(self, segment_tokens=segment, overlap=overlap, window=window)

    def select(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        max_new_tokens: int,
        question_ids: torch.Tensor | None = None,
        progress: bool = True,
    ) -> Selection:
        """The key context for `ids` (1, n): its question is `question_ids` (1, q) if given
        (then all of `ids` is context), else its last `question_tokens` tokens."""
        if state_of(model) is not None:
            raise ValueError("xl3m runs the plain model: call lminf.unpatch(model) first.")
        s = self.resolved(model.config)
        context, question = split_question(ids, s.question_tokens, question_ids)
        if s.segment_tokens + question.shape[1] > s.window:
            raise ValueError(
                f"a segment ({s.segment_tokens}) and the question ({question.shape[1]}) exceed the window ({s.window}).",
            )
        budget = s.window - question.shape[1] - max_new_tokens  # context tokens the key context may hold
        if budget < s.segment_tokens:
            raise ValueError(
                f"the window {s.window} leaves {budget} tokens for context after the question ({question.shape[1]}) "
                f"and {max_new_tokens} new tokens: fewer than one segment ({s.segment_tokens})."
            )
        spans = split(context.shape[1], s.segment_tokens, s.overlap)
        if context.shape[1] <= budget:  # it all fits: nothing to choose
            return Selection(spans, None, list(range(len(spans))), torch.cat([context, question], dim=1))
        entropies = score(model, context, question, spans, s.batch_size, progress)
        chosen = choose(spans, entropies, budget, s.max_segments)
        return Selection(spans, entropies, chosen, torch.cat([splice(context, spans, chosen), question], dim=1))

    def generate(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        max_new_tokens: int,
        question_ids: torch.Tensor | None = None,
        stop: Collection[int] = (),
        progress: bool = True,
    ) -> tuple[list[int], Selection]:
        """Greedy answer to `ids` (see `select`) from its key context, by the plain model: the
        new tokens (ended after a token in `stop` or `max_new_tokens`) and the selection."""
        selection = self.select(model, ids, max_new_tokens, question_ids, progress)
        return greedy(model, selection.key_ids, DynamicCache(), max_new_tokens, stop=stop), selection


def split_question(
    ids: torch.Tensor, question_tokens: int, question_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, question) of `ids` (1, n): the question given apart, else the last `question_tokens`."""
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"xl3m needs ids of shape (1, n), got {tuple(ids.shape)}.")
    if question_ids is not None:
        if question_ids.ndim != 2 or question_ids.shape[0] != 1 or question_ids.shape[1] < 1:
            raise ValueError(f"xl3m needs question ids of shape (1, q), got {tuple(question_ids.shape)}.")
        return ids, question_ids.to(ids.device)
    if ids.shape[1] <= question_tokens:
        raise ValueError(f"the input ({ids.shape[1]} tokens) has no context before its last {question_tokens} (the question).")
    return ids[:, :-question_tokens], ids[:, -question_tokens:]


def split(length: int, segment_tokens: int, overlap: int) -> list[Span]:
    """Segments of `segment_tokens` covering [0, length), in order, each starting
    segment_tokens - overlap after the one before; the last ends at `length` (so it may share
    more than `overlap` with its neighbour, and every segment is full when length allows)."""
    step = segment_tokens - overlap
    if length <= segment_tokens:
        return [(0, length)]
    starts = list(range(0, length - segment_tokens, step))
    if starts[-1] + segment_tokens < length:
        starts.append(length - segment_tokens)
    return [(a, a + segment_tokens) for a in starts]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, float64) of the softmax of `logits` (..., vocab) over its last dimension."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.inference_mode()
def score(
    model: PreTrainedModel,
    context: torch.Tensor,
    question: torch.Tensor,
    spans: list[Span],
    batch_size: int = 4,
    progress: bool = True,
) -> list[float]:
    """Per segment, the mean entropy of the model's next-token distributions at the question's
    positions (the last predicts the answer) of the sub-context [segment | question]."""
    q = question.shape[1]
    entropies: list[float] = []
    bar = tqdm(total=len(spans), desc="xl3m segments", unit="seg", file=sys.stderr, disable=not progress)
    for a in range(0, len(spans), batch_size):
        batch = spans[a : a + batch_size]
        # split() makes every segment one length, so a batch stacks without padding.
        rows = torch.cat([torch.cat([context[:, i:j], question], dim=1) for i, j in batch])
        logits = model(rows, use_cache=False, logits_to_keep=q).logits
        entropies += entropy(logits).mean(-1).tolist()
        bar.update(len(batch))
    bar.close()
    return entropies


def spliced_length(spans: list[Span], chosen: Collection[int]) -> int:
    """Tokens of the union of the chosen spans (what their splice holds)."""
    return len(set().union(*(range(*spans[i]) for i in chosen))) if chosen else 0


def choose(spans: list[Span], entropies: list[float], budget: int, max_segments: int | None = None) -> list[int]:
    """Indices of the segments to keep, in their original order: the most certain (lowest
    entropy; ties to the earlier) first, each kept while the de-overlapped splice still fits
    `budget` tokens, up to `max_segments`."""
    chosen: list[int] = []
    for i in sorted(range(len(spans)), key=lambda i: (entropies[i], i)):
        if max_segments is not None and len(chosen) == max_segments:
            break
        if spliced_length(spans, [*chosen, i]) <= budget:
            chosen.append(i)
    return sorted(chosen)


def splice(context: torch.Tensor, spans: list[Span], chosen: Collection[int]) -> torch.Tensor:
    """The chosen segments of `context` (1, n) in their original order, each token once (1, m)."""
    keep = torch.zeros(context.shape[1], dtype=torch.bool, device=context.device)
    for i in chosen:
        keep[spans[i][0] : spans[i][1]] = True
    return context[:, keep]
