"""SirLLM (Yao et al., ACL 2024, arXiv 2405.12528): a bounded cache of the first tokens, the
best-scored tokens and the most recent ones, where a token's score is its surprisal under the
model (-log p of the token that is there), multiplied by `decay` at every turn.

Attention is plain causal attention over [kept keys | the call's keys], placed as the official
code's "pos-shift" places them: the kept keys at their slots 0..n-1 in the cache, the call's
tokens after them. Keys are stored rotated at their true positions and re-rotated by
(slot - position) in each call. The cache (lminf.caches.turn_cache) evicts between calls, so
the output depends on how the input is split into calls and turns, by design.

Scores come from the model's logits (the patched forward asks for every position's, see
`token_scores`): `score="surprisal"`, the paper's -log p(x_i | x_<i); `score="released"`, what
the released code computes, the prediction made at i evaluated on the token at i, shifted one
to the right. Either way the first token of a call gets the call's highest score where no
earlier prediction is at hand, as the released code does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from lminf.caches.turn_cache import ScoredLayer
from lminf.kernels.sdpa import alibi_bias, attend, rows, rows_mask, use_flash, wide
from lminf.layout import Layout
from lminf.rope import rotate, rotation
from lminf.strategies.base import AttentionCall, Rule, Strategy, register

PADDING = "strategy sirllm does not support padded batches: run rows of different lengths one at a time."
SCORES = ("surprisal", "released")
RECENT = 1000  # n_local's default: the released code's recent_size
SCORE_ROWS = 256  # rows of logits turned into log-probabilities at a time (each is vocabulary-wide)


@register
@dataclass(frozen=True)
class SirLLM(Strategy):
    """The first `n_global` tokens, the `n_scored` best-scored ones and the `n_local` most recent
    ones, re-placed contiguously (pos-shift). Defaults: the released code's (4, 1000, 1000, decay 1)."""

    name = "sirllm"
    stateful = True  # it reads its own cache's positions
    pads = False
    same_across_calls = False  # eviction between calls
    needs_scores = True  # the patched forward scores every token for its cache

    n_global: int = field(default=4, metadata={"help": "first tokens every query sees"})
    n_local: int | None = field(default=RECENT, metadata={"help": "recent tokens kept (sirllm: default 1000)"})
    n_scored: int = field(default=1000, metadata={"help": "tokens kept for their score (sirllm)"})
    decay: float = field(default=1.0, metadata={"help": "factor on every kept token's score at each turn (sirllm)"})
    score: str = field(default="surprisal", metadata={"help": "surprisal (the paper's) or released (the code's) (sirllm)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for setting in ("n_scored", "n_local"):
            value = getattr(self, setting)
            if value is not None and value < 0:
                raise ValueError(f"{setting} must be >= 0, got {value}.")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}.")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}.")
        if self.cache_bound() - self.n_global < 1:
            raise ValueError("sirllm needs n_scored + n_local >= 1: room for the new tokens of a call.")

    def resolve(self, config: PretrainedConfig) -> SirLLM:
        return self if self.n_local is not None else dataclasses.replace(self, n_local=RECENT)

    def cache_bound(self) -> int:
        return self.n_global + self.n_scored + (RECENT if self.n_local is None else self.n_local)

    def plain_up_to(self) -> int:
        return self.cache_bound()  # a call on an empty cache that fits it attends to all of itself

    def keys_for(self, q_start: int, total: int) -> tuple[int, int]:
        raise NotImplementedError("sirllm keeps tokens by their scores in its own cache; an engine cannot gather its keys.")

    def cache_layer(self, left_pad: int = 0) -> ScoredLayer:
        if left_pad:
            raise ValueError(PADDING)
        return ScoredLayer(self)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
        if not bool(layout.k_valid.all()):
            raise ValueError(PADDING)
        if not isinstance(call.memory, ScoredLayer) and (k.shape[-2] != q.shape[-2] or int(layout.q_pos.min()) != 0):
            raise ValueError(
                "strategy sirllm keeps its tokens in its own cache: pass lminf.make_cache(model) "
                "to every forward call (model.generate does), or the whole input in one call."
            )
        B, Hq, Q, D = q.shape
        K, rep = k.shape[-2], Hq // k.shape[1]
        q_slot, k_slot = layout.once(("slots", Q, K), _slots, Q, K, q.device)
        if call.inv_freq is not None:  # re-place: every key at its slot, the queries after the kept ones
            exact = wide(q[..., :0]).dtype
            key = ("re-placed", call.inv_freq.data_ptr(), call.interleaved, exact)
            q_turn, k_turn = layout.once(key, _rotations, layout, q_slot, k_slot, call.inv_freq, call.interleaved, exact)
            q, k = rotate(q, q_turn, call.interleaved), rotate(k, k_turn, call.interleaved)
        distance = q_slot[:, None] - k_slot[None, :]  # (Q, K)
        seen = (distance >= 0)[None].expand(B, -1, -1)
        if call.alibi is None:
            mask = None if Q == 1 else layout.once(("causal", Q, K, B, rep), rows_mask, seen, rep)
        else:
            mask = alibi_bias(distance[None].expand(B, -1, -1), seen, call.alibi, rep)
        grouped = rows(q.reshape(B, k.shape[1], rep, Q, D))
        o, _ = attend(grouped, k, v, mask, call.scaling, use_flash(call.kernel, q.device), softcap=call.softcap)
        return o.view(B, Hq, Q, D).to(q.dtype)

    def rule(self, i: torch.Tensor, j: torch.Tensor, layer: int) -> Rule:
        """j: the positions of the keys the cache holds for this call (and the call's own): each
        query sees them all, at the distance between their slots, i.e. the number of held
        keys at positions in [j, i)."""
        held = j[:, 0, :]  # (B or 1, K), in order
        k_slot = (held[:, None, :] < held[:, :, None]).sum(-1)  # (B, K): held keys before each
        q_slot = (held[:, None, :] < i).sum(-1)  # (B, Q): held keys before each query
        distance = q_slot[:, :, None] - k_slot[:, None, :]
        seen = (j <= i).expand(distance.shape)
        return Rule(seen, distance, torch.zeros_like(seen))

    def token_scores(
        self, logits: torch.Tensor, ids: torch.Tensor, last_logprobs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, m) float64 of a call's tokens `ids` (B, m) from its logits (B, m, vocab), and
        its last row's log-probabilities, the prediction of the next call's first token. In
        "surprisal" a call's first token is scored by `last_logprobs` (the previous call's), if any."""
        B, m, _ = logits.shape
        # picked[:, i] = log p_i(ids[:, i + shift]): the prediction at i of the token at i + shift
        shift = 1 if self.score == "surprisal" else 0
        targets = torch.cat((ids[:, shift:], ids[:, :shift]), dim=1)  # the last `shift` are not used
        picked = torch.empty(B, m, dtype=torch.float64, device=logits.device)
        for a in range(0, m, SCORE_ROWS):
            logp = logits[:, a : a + SCORE_ROWS].float().log_softmax(-1)
            picked[:, a : a + SCORE_ROWS] = logp.gather(-1, targets[:, a : a + SCORE_ROWS, None])[..., 0].double()
        last = logp[:, -1]
        neglogp = -picked[:, : m - shift]  # released: all m; surprisal: the first m - 1, for tokens 1..m-1
        if self.score == "released":  # the released code: the call's highest first, the last dropped
            first = neglogp.amax(-1, keepdim=True)
            return torch.cat((first, neglogp[:, :-1]), dim=-1), last
        if last_logprobs is not None:
            first = -last_logprobs.gather(-1, ids[:, :1]).double()
        elif m > 1:
            first = neglogp.amax(-1, keepdim=True)
        else:
            first = torch.zeros(B, 1, dtype=torch.float64, device=logits.device)
        return torch.cat((first, neglogp), dim=-1), last


def _slots(Q: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots of the queries, the last Q keys; slots of the keys), in the cache's order."""
    k_slot = torch.arange(K, device=device)
    return k_slot[K - Q :], k_slot


def _rotations(layout: Layout, q_slot, k_slot, inv_freq, interleaved: bool, exact: torch.dtype):
    """cos and sin that turn the queries and keys from their true positions to their slots."""
    return (
        rotation(q_slot[None] - layout.q_pos, inv_freq, interleaved, exact),
        rotation(k_slot[None] - layout.k_pos, inv_freq, interleaved, exact),
    )
