"""Plugging a strategy into a transformers model, in place.

Everything goes through transformers' public extension points:
- `AttentionInterface.register("lminf", ...)`: our attention function, called by every
  attention layer with rotated queries and keys; it hands them to the strategy;
- `AttentionMaskInterface.register("lminf", ...)`: instead of an n x n mask it returns
  a `Layout` (positions of queries and keys, see lminf.layout);
- the strategy's cache (a `Cache`), which `model.generate` gets by default after `patch`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from lminf.caches.lambda_cache import LambdaCache, LambdaLayer
from lminf.caches.turn_cache import ScoredLayer, TurnCache, begin_turn
from lminf.families import (
    FAMILIES,
    Family,
    LayerKind,
    attention_modules,
    check_supported,
    layer_inv_freq,
    layer_kinds,
    rotary_embedding,
)
from lminf.generation import PREFILL_CHUNK, cache_kwarg, prefill
from lminf.kernels.sdpa import check_kernel
from lminf.layout import Layout, lambda_mask
from lminf.strategies import AttentionCall, Strategy, build
from lminf.strategies.windowed import ModelWindow

if TYPE_CHECKING:
    from lminf.decoding import FastStep

IMPLEMENTATION = "lminf"
GLOBAL_DISTANCES = {"capped": "lminf", "reindexed": "sinks"}  # the older spelling of a strategy choice
DECODE_STEPS = ("auto", "fast", "forward")  # generate's decode_step: the fast step where it applies, always, never
# A function that replaces the strategy's attention (the tests' dense reference does).
Backend = Callable[[Strategy, torch.Tensor, torch.Tensor, torch.Tensor, Layout, AttentionCall], torch.Tensor]


@dataclass
class _PatchState:
    strategy: Strategy
    family: Family
    kinds: list[LayerKind]  # what each attention layer is (lminf.families)
    rotary: torch.nn.Module | None  # the model's rotary embedding (frequencies move with it); None: no rotary layer
    kernel: str
    backend: Backend | None
    previous_implementation: str
    kv_dtype: torch.dtype | None = None  # what the cache stores keys and values in (None: as the model computes them)
    prepared: object | None = None  # what the family's `prepare` did, undone by unpatch
    cache: Cache | None = None  # the cache of the forward call running now (for a stateful strategy)
    hooks: list = field(default_factory=list)
    previous_forward: Callable | None = None  # the instance's own forward before patch (accelerate may set one)
    fast_steps: dict[int, FastStep] = field(default_factory=dict)  # id(cache) -> its step, while generate runs
    _pinned: dict[int, Strategy] = field(default_factory=dict)
    _windows: dict[int, Strategy] = field(default_factory=dict)  # the sliding layers', one per window size

    def strategy_for(self, n_global: int | None, layer: int | None = None) -> Strategy:
        """What runs in `layer` (None: the global layers): the strategy, with `n_global` first
        tokens pinned if given (worked out once per value); in a sliding layer the model's own window."""
        if layer is not None and not self.kinds[layer].is_global:
            window = self.kinds[layer].window
            if window not in self._windows:
                self._windows[window] = ModelWindow(n_local=window)
            return self._windows[window]
        if n_global is None:
            return self.strategy
        if n_global not in self._pinned:
            self._pinned[n_global] = self.strategy.pinned(n_global)
        return self._pinned[n_global]


class PatchView(NamedTuple):
    """What a patched model runs, for code that decodes through it (lminf.decoding): read, never set."""

    kinds: tuple[LayerKind, ...]  # what each attention layer is (lminf.families)
    rotary: torch.nn.Module | None  # the model's rotary embedding; None: no rotary layer
    kernel: str  # patch's backend, where it names a kernel
    replaced: bool  # an attention function replaces the strategy's (patch's backend)
    strategy_for: Callable[[int | None], Strategy]  # n_global -> the global layers' strategy, that many first tokens pinned


def state_of(model: PreTrainedModel) -> PatchView | None:
    """What `patch` set on `model`; None where it is not patched."""
    state: _PatchState | None = getattr(model, "_lminf", None)
    if state is None:
        return None
    return PatchView(tuple(state.kinds), state.rotary, state.kernel, state.backend is not None, state.strategy_for)


def lminf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Layout | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls per layer: (B, Hq, Q, D) -> (B, Q, Hq, D)."""
    state: _PatchState | None = getattr(module, "_lminf", None)
    if state is None:
        raise RuntimeError("attn_implementation='lminf' is set but the model was not patched: use lminf.patch(model).")
    if not isinstance(attention_mask, Layout):
        raise TypeError(
            "lminf attention needs the Layout built by its own mask function, got "
            f"{type(attention_mask).__name__}; pass a 2D attention_mask (batch, tokens), not a 4D one."
        )
    layer, kind = module.layer_idx, state.kinds[module.layer_idx]
    if kwargs.get("sliding_window") != kind.window:  # the model disagrees with lminf's description of its family
        raise RuntimeError(
            f"lminf: layer {layer} was described as window {kind.window} (lminf.families), but the model "
            f"passed sliding_window={kwargs.get('sliding_window')}; please report this model."
        )
    # A forward call may pin a longer prefix as global (e.g. a chat's system prompt).
    strategy = state.strategy_for(kwargs.get("lminf_n_global"), layer)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    inv_freq = layer_inv_freq(state.family, state.rotary, kind)
    alibi = getattr(module, "_lminf_alibi", None)  # ALiBi slopes, put there by the family's adapter (MPT)
    memory = None
    if strategy.stateful and state.cache is not None and len(getattr(state.cache, "layers", ())) > layer:
        memory = state.cache.layers[layer]  # the strategy checks it is its own kind of layer
    if isinstance(memory, ScoredLayer):  # it keeps keys of scattered positions: the mask function only counted them
        attention_mask = memory.key_layout(attention_mask)
    call = AttentionCall(layer, inv_freq, scaling, state.kernel, kwargs.get("softcap"), state.family.interleaved, alibi, memory)
    attend = strategy.attention if state.backend is None else functools.partial(state.backend, strategy)
    out = attend(query, key, value, attention_mask, call)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, lminf_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, lambda_mask)


def patch(
    model: PreTrainedModel,
    strategy: Strategy | str | None = None,
    *,
    backend: str | Backend = "auto",
    kv_dtype: torch.dtype | None = None,
    **settings,
) -> PreTrainedModel:
    """Switch `model`'s attention to a strategy, in place; returns the model.

    strategy: a `Strategy` (`lminf.LMInfinite(...)`, `lminf.Sinks(...)`) or a registered
        name ("lminf", "sinks"); default LM-Infinite.
    settings: the strategy's settings as keywords, e.g. for LM-Infinite
        n_global=10: first tokens every query attends to, seen at distance n_local;
        n_local=None: most recent tokens every query attends to (default: the training length,
            config.max_position_embeddings);
        top_k=0, top_k_from_layer=4: middle tokens each query head also attends to, in layers
            >= top_k_from_layer (with top_k > 0 the generation cache keeps every token);
        global_distance="capped" | "reindexed" is the older spelling of strategy "lminf" | "sinks".
    backend: the kernel, one of "auto" (on a CPU lminf's C++ kernels for a decoding step with
        float32 or 4-bit weights: every layer and its attention in one call, lminf.decoding.native,
        built on first use; torch's fused kernel for the rest), "torch", "flash_cpu"; or a function
        (strategy, q, k, v, layout, call) -> output that replaces the strategy's attention.
    kv_dtype: store the cache's keys and values in this dtype (torch.bfloat16 halves a float32
        model's cache and what a decoding step reads; attention still sums in float32); None: the model's.
    """
    if getattr(model, "_lminf", None) is not None:
        raise RuntimeError("this model is already patched by lminf; call lminf.unpatch(model) first.")
    check_supported(model)
    if isinstance(backend, str):
        check_kernel(backend, "backend (a kernel name or an attention function)")
    strategy = _strategy(strategy, settings).resolve(model.config)
    if kv_dtype is not None and not takes_kv_dtype(strategy):
        raise ValueError(f"kv_dtype is not supported by strategy {strategy.name!r} yet (its cache is its own).")
    kinds = layer_kinds(model.config)
    state = _PatchState(
        strategy=strategy,
        family=FAMILIES[model.config.model_type],
        kinds=kinds,
        rotary=rotary_embedding(model) if any(kind.rotary for kind in kinds) else None,
        kernel=backend if isinstance(backend, str) else "auto",
        backend=None if isinstance(backend, str) else backend,
        previous_implementation=model.config._attn_implementation,
        kv_dtype=kv_dtype,
    )
    for module in attention_modules(model):
        module._lminf = state
    _build_kernels(model, state.kernel)
    if state.family.prepare is not None:
        state.prepared = state.family.prepare(model)
    if strategy.stateful:  # its attention reads its own cache layer: note which cache each forward call uses
        state.hooks = _note_cache(model, state)
    model._lminf = state
    if model.config._attn_implementation != IMPLEMENTATION:  # an adapter may have set it (MPT cannot switch)
        model.set_attn_implementation(IMPLEMENTATION)
    state.previous_forward = vars(model).get("forward")
    model.forward = _forward_with_fast_step(model, state)
    if strategy.needs_scores:
        model.forward = _forward_with_scores(model, model.forward)
    model.generate = _generate_with_strategy_cache(model)
    return model


def _build_kernels(model: PreTrainedModel, kernel: str) -> None:
    """lminf's C++ kernels, built now on first use where decoding runs them, not in a timed step."""
    if kernel == "auto" and model.device.type == "cpu" and model.dtype == torch.float32:
        from lminf.decoding import native  # lazily: the decoding package asks patching for its state

        native.op()


def _strategy(strategy: Strategy | str | None, settings: dict) -> Strategy:
    """The strategy `patch` was asked for, the older `global_distance` keyword included."""
    if strategy is not None and not isinstance(strategy, (Strategy, str)):
        raise TypeError(f"patch's second argument is a strategy or its name, got {strategy!r}; pass settings as keywords.")
    distance = settings.pop("global_distance", None)
    if distance is not None:
        if distance not in GLOBAL_DISTANCES or (distance == "reindexed" and settings.get("top_k")):
            choices = tuple(GLOBAL_DISTANCES)
            raise ValueError(f"global_distance must be one of {choices} (reindexed needs top_k=0), got {distance!r}.")
        if strategy is not None:
            raise ValueError("give a strategy or global_distance, not both.")
        strategy = GLOBAL_DISTANCES[distance]
        if strategy == "sinks":  # its settings have no top-k
            settings = {k: v for k, v in settings.items() if k not in ("top_k", "top_k_from_layer")}
    return build("lminf" if strategy is None else strategy, **settings)


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `patch`: restore the previous attention implementation and plain `generate`."""
    state = getattr(model, "_lminf", None)
    if state is None:
        raise RuntimeError("this model is not patched by lminf.")
    for module in attention_modules(model):
        del module._lminf
    if state.prepared is not None:
        state.prepared.remove()
    for hook in state.hooks:
        hook.remove()
    del model._lminf
    del model.generate  # the instance attribute; the class method shows through again
    if state.previous_forward is None:
        del model.forward
    else:
        model.forward = state.previous_forward
    model.set_attn_implementation(state.previous_implementation)
    return model


def takes_kv_dtype(strategy: Strategy) -> bool:
    """Whether the (resolved) strategy's cache can store keys and values in another dtype: LambdaCache's can."""
    return isinstance(strategy.cache_layer(), LambdaLayer)


def settings_of(model: PreTrainedModel) -> Strategy:
    """The strategy a patched model runs, with its settings resolved for the model."""
    state = getattr(model, "_lminf", None)
    if state is None:
        raise RuntimeError("this model is not patched by lminf; call lminf.patch(model) first.")
    return state.strategy


def make_cache(model: PreTrainedModel, attention_mask: torch.Tensor | None = None, n_global: int | None = None) -> Cache:
    """The cache the patched model's strategy needs. Pass the prompt's 2D attention_mask when
    the batch is left-padded: the sink region grows by the padding so every row keeps its
    own first n_global tokens. `n_global` overrides the model's setting; pass the same
    value as `lminf_n_global=` to every forward call that uses this cache."""
    settings_of(model)  # the model must be patched
    left_pad = 0
    if attention_mask is not None:
        left_pad = int((attention_mask.cumsum(-1) == 0).sum(-1).max())
    state: _PatchState = model._lminf
    layers = [state.strategy_for(n_global, i).cache_layer(left_pad) for i in range(len(state.kinds))]
    for layer in layers:
        layer.in_order = state.family.alibi
        if state.kv_dtype is not None:
            layer.kv_dtype = state.kv_dtype
    return TurnCache(layers) if any(isinstance(layer, ScoredLayer) for layer in layers) else LambdaCache(layers)


def layer_strategy(model: PreTrainedModel, layer: int) -> Strategy:
    """What a patched model runs in one layer: its strategy, or the model's own window in a sliding layer."""
    settings_of(model)
    return model._lminf.strategy_for(None, layer)


def _note_cache(model: PreTrainedModel, state: _PatchState) -> list:
    """Hooks on the decoder that keep the cache of the running forward call in `state.cache`."""

    def before(module, args, kwargs):
        state.cache = kwargs.get("cache", kwargs.get("past_key_values"))

    def after(module, args, kwargs, output):
        state.cache = None

    decoder = model.get_decoder()
    return [
        decoder.register_forward_pre_hook(before, with_kwargs=True),
        decoder.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]


def _generate_with_strategy_cache(model: PreTrainedModel) -> Callable:
    original = type(model).generate.__get__(model)
    state: _PatchState = model._lminf

    @functools.wraps(original)
    def generate(*args, prefill_chunk: int = PREFILL_CHUNK, decode_step: str = "auto", turn: bool = True, **kwargs):
        """transformers' generate, through the strategy's cache (made here unless one is passed):
        the prompt goes through it in chunks of `prefill_chunk` tokens first. decode_step: "auto"
        decodes through lminf's fast step where it applies (lminf.decoding), "fast" insists
        (an error says why it cannot), "forward" always runs the model's forward. turn: the call
        is one turn, for a cache that counts turns (SirLLM's); False: part of one announced already
        (lminf.begin_turn)."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}.")
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {DECODE_STEPS}, got {decode_step!r}.")
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:  # either name, as the installed transformers takes
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            cache = make_cache(model, mask)
            kwargs.update(cache_kwarg(model, cache))
            if turn:
                _begin_turn(model, cache, ids, kwargs)
            if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1] - 1 > prefill_chunk:
                prefill(model, ids[:, :-1], cache, None if mask is None else mask[:, :-1], prefill_chunk, turn=False)
        else:
            _check_cache_leaves_a_token(cache, ids)
            if turn:
                _begin_turn(model, cache, ids, kwargs)
        reason = None if decode_step == "forward" else _why_not_fast(model, cache, ids, mask, kwargs)
        if decode_step == "fast" and reason is not None:
            raise ValueError(f"decode_step='fast' cannot run here: {reason}.")
        if decode_step == "forward" or reason is not None:
            return original(*args, **kwargs)  # generate() runs only the tokens the cache has not seen
        from lminf.decoding import FastStep  # lminf.decoding reads state_of: imported here, not at the top

        state.fast_steps[id(cache)] = FastStep(model, cache)
        try:
            return original(*args, **kwargs)
        finally:
            state.fast_steps.pop(id(cache), None)

    return generate


def _begin_turn(model: PreTrainedModel, cache: Cache, ids, kwargs: dict) -> None:
    """A generate call is one turn: its prompt tokens the cache has not seen and the new ones."""
    if isinstance(cache, TurnCache) and isinstance(ids, torch.Tensor):
        new = kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens or 0
        begin_turn(cache, ids.shape[-1] - cache.get_seq_length() + new)


def _check_cache_leaves_a_token(cache: Cache, ids) -> None:
    """A passed cache must have seen fewer tokens than the prompt: generate needs at least its last
    token to run, and given a cache that holds all of it, transformers feeds the whole prompt again."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return
    seen = cache.get_seq_length()
    if seen >= ids.shape[1]:
        raise ValueError(
            f"the cache has seen {seen} tokens, the prompt has {ids.shape[1]}: generate must run at least the "
            "prompt's last token, so prefill all but it (lminf.prefill(model, ids[:, :-1], cache)) and pass the "
            "whole prompt to generate."
        )


def _why_not_fast(model: PreTrainedModel, cache: Cache, ids, mask: torch.Tensor | None, kwargs: dict) -> str | None:
    """Why generate cannot decode through the fast step; None when it can."""
    from lminf.decoding import why_not

    reason = why_not(model, cache)
    if reason is not None:
        return reason
    if not isinstance(ids, torch.Tensor) or ids.shape[0] != 1:
        return "the fast step decodes one row of input_ids"
    if mask is not None and not bool(mask.all()):
        return "the attention mask hides tokens (the fast step reads every stored one)"
    if kwargs.get("position_ids") is not None:
        return "explicit position_ids (the fast step places tokens by their count in the cache)"
    return None


# The keywords of a decoding call from transformers' generate that the fast step serves (others: the forward).
# Its positions are the cache's count of tokens: generate checked that no token is masked.
_STEP_KEYWORDS = frozenset(
    {"input_ids", "attention_mask", "position_ids", "cache_position", "cache", "past_key_values"}
    | {"use_cache", "return_dict", "logits_to_keep"}
)


def _forward_with_fast_step(model: PreTrainedModel, state: _PatchState) -> Callable:
    """The model's forward, except that a one-token call on a cache that generate is decoding
    through the fast step (state.fast_steps) runs that step. It returns only the logits and the
    cache, all that generate reads of a decoding call."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if state.fast_steps and not args and kwargs.keys() <= _STEP_KEYWORDS:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            step = state.fast_steps.get(id(cache))
            ids = kwargs.get("input_ids")
            one_token = ids is not None and ids.shape == (1, 1) and kwargs.get("use_cache", True)
            if step is not None and step.cache is cache and one_token:
                return CausalLMOutputWithPast(logits=step(ids)[:, None], **cache_kwarg(model, cache))
        return original(*args, **kwargs)

    return forward


def _forward_with_scores(model: PreTrainedModel, forward: Callable) -> Callable:
    """The model's forward for a strategy whose cache evicts by score (SirLLM): on its cache, a
    call makes room for its tokens first, then the cache records their scores, computed from
    the logits of every position (asked for here); it returns the logits the caller asked for.
    A call too long to fit is fed in the cache's pieces, each a call of its own."""
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    strategy = model._lminf.strategy

    @functools.wraps(forward)
    def scored_forward(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, TurnCache):
            return forward(*args, **kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.get("input_ids")
        if ids is None or args:
            raise ValueError("strategy sirllm scores the tokens of a call: pass input_ids (not inputs_embeds) as keywords.")
        keep = kwargs.pop("logits_to_keep", 0)
        if takes_logits_to_keep:
            kwargs["logits_to_keep"] = 0  # every position's: each token's score needs them
        kwargs["return_dict"] = True
        m, logits, a = ids.shape[1], [], 0
        for size in cache.pieces(m):
            cache.make_room(size)
            out = forward(**_piece(kwargs, m, a, a + size))
            scores, last = strategy.token_scores(out.logits, ids[:, a : a + size], cache.last_logprobs)
            cache.record(scores, last)
            logits.append(out.logits[:, -keep:] if isinstance(keep, int) and keep else out.logits)  # only what is asked
            a += size
        logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
        if isinstance(keep, int):
            logits = logits[:, -keep:] if keep else logits
        else:
            logits = logits[:, keep]
        return CausalLMOutputWithPast(logits=logits, **cache_kwarg(model, cache))

    return scored_forward


def _piece(kwargs: dict, m: int, a: int, b: int) -> dict:
    """A forward call's keywords for its tokens [a, b) of m (the mask covers every token seen)."""
    if (a, b) == (0, m):
        return kwargs
    piece = dict(kwargs)
    for name in ("input_ids", "position_ids"):
        if piece.get(name) is not None:
            piece[name] = piece[name][..., a:b]
    if piece.get("cache_position") is not None:
        piece["cache_position"] = piece["cache_position"][a:b]
    mask = piece.get("attention_mask")
    if mask is not None:
        piece["attention_mask"] = mask[:, : mask.shape[1] - m + b]
    return piece
