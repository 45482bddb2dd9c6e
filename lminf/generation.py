"""Token loops shared by the CLI, the evaluations and the benchmark: feeding a prompt
through a cache in chunks, greedy continuation, and per-token NLL.

They work on any transformers causal LM and any `Cache`: a patched model with its
bounded cache, or the vanilla model with a `DynamicCache`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Collection

import torch
from tqdm import tqdm
from transformers import Cache, PreTrainedModel

from lminf.caches.turn_cache import TurnCache, begin_turn

PREFILL_CHUNK = 2048  # prompt tokens per forward call


def cache_kwarg(module: torch.nn.Module, cache: Cache | None) -> dict:
    """{keyword: cache} for a forward or generate call: transformers 5.2x renamed `past_key_values`
    to `cache` (the old name warns, and goes in 5.40); the vLLM venv's 5.19 knows only the old one."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(module_type: type) -> str:
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = PREFILL_CHUNK,
    progress: bool = False,
    turn: bool = True,
) -> None:
    """Feed `input_ids` through `cache` `chunk_size` tokens at a time, so activation memory
    stays bounded whatever the length. Positions follow generate()'s rule for padded rows.
    To continue with `generate`, prefill all but the prompt's last token and pass the whole
    prompt with this cache: generate runs only the tokens the cache has not seen.
    turn: the input is one turn, for a cache that counts turns (SirLLM's); False: part of one
    announced already (generate announces its own)."""
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    n = input_ids.shape[1]
    if turn:
        begin_turn(cache, n)
    bar = tqdm(total=n, desc="prefill", unit="tok", file=sys.stderr, disable=not progress)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        model(
            input_ids[:, a:b],
            attention_mask=None if attention_mask is None else attention_mask[:, :b],
            position_ids=None if position_ids is None else position_ids[:, a:b],
            **cache_kwarg(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
        bar.update(b - a)
    bar.close()


def decoder(model: PreTrainedModel, cache: Cache, n_global: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A decoding step, token (B, 1) -> next-token logits (B, vocab) float32, through `cache`: the
    fast step where it applies (lminf.decoding.why_not), the model's forward elsewhere.
    n_global: the first tokens the cache pins (a forward call's `lminf_n_global`)."""
    from lminf.decoding import FastStep, why_not  # lminf.decoding imports lminf.patching, which imports this module

    return FastStep(model, cache, n_global) if why_not(model, cache, n_global) is None else forward_step(model, cache, n_global)


def forward_step(model: PreTrainedModel, cache: Cache, n_global: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoding step through the model's own forward (what `decoder` falls back to)."""
    extra = {} if n_global is None else {"lminf_n_global": n_global}

    @torch.inference_mode()
    def step(token: torch.Tensor) -> torch.Tensor:
        return model(token, **cache_kwarg(model, cache), use_cache=True, **extra).logits[:, -1].float()

    return step


@torch.inference_mode()
def greedy(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    chunk_size: int = PREFILL_CHUNK,
    stop: Collection[int] = (),
) -> list[int]:
    """Greedy continuation of `ids` (1, n); the prompt goes through `cache` in chunks. It ends
    after a token in `stop` (kept in the output) or `max_new_tokens` tokens."""
    check_ids(ids)
    prefill(model, ids[:, :-1], cache, chunk_size=chunk_size)
    token, out, step = ids[:, -1:], [], decoder(model, cache)
    for _ in range(max_new_tokens):
        token = step(token).argmax(-1, keepdim=True)
        out.append(int(token))
        if out[-1] in stop:
            break
    return out


@torch.inference_mode()
def token_nll(
    model: PreTrainedModel, ids: torch.Tensor, cache: Cache, chunk_size: int = PREFILL_CHUNK, progress: bool = True
) -> torch.Tensor:
    """NLL (nats) of tokens 1..n-1 of `ids` (1, n), each given all tokens before it -> (n - 1,) float32."""
    check_ids(ids)
    nll = []
    n = ids.shape[1]
    for a in tqdm(range(0, n - 1, chunk_size), desc="nll", unit="chunk", disable=not progress):
        nll.append(chunk_nll(model, ids, a, min(a + chunk_size, n - 1), cache))
    return torch.cat(nll)


def chunk_nll(model: PreTrainedModel, ids: torch.Tensor, a: int, b: int, cache: Cache) -> torch.Tensor:
    """NLL of tokens a+1..b of `ids` (1, n), feeding tokens a..b-1 through `cache` -> (b - a,) float32.
    The decoder alone and the output layer on the rows needed; a cache that scores every token
    (SirLLM's) needs the model's own forward, which computes every position's logits anyway."""
    if isinstance(cache, TurnCache):
        logits = model(ids[:, a:b], **cache_kwarg(model, cache), use_cache=True).logits[0].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, a + 1 : b + 1], reduction="none")
    decoder = model.get_decoder()
    hidden = decoder(ids[:, a:b], **cache_kwarg(decoder, cache), use_cache=True).last_hidden_state
    return target_nll(model, hidden[0], ids[0, a + 1 : b + 1])


def target_nll(model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of `targets` (n,) under the output layer applied to the first n rows of `hidden` (>= n, hidden).
    The decoder and output layer are found by transformers' own accessors (GPT-NeoX calls its head embed_out)."""
    logits = model.get_output_embeddings()(hidden[: len(targets)]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma 2 caps its output logits, as its own forward does
        logits = cap * torch.tanh(logits / cap)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def check_ids(ids: torch.Tensor) -> None:
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"need ids of shape (1, n) with n >= 2, got {tuple(ids.shape)}.")
