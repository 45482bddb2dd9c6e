"""A decoding step for Llama-shaped models that skips transformers' per-layer machinery.

Why: a decoding step is one token through every layer, and on a CPU part of its time is
per-call overhead: the model's forward makes about 110 torch calls a layer (mask and position
plumbing, the rotary embedding, our Layout, one attention pass per key set and their merge).
This step runs the same weights and the same cache with the attention of the one query written
directly: one pass over the window and the first tokens, those moved to where the query sees
them at the strategy's distance (no second pass, no merge). Where lminf's C++ kernels build
(float32 or 4-bit weights on a CPU, kernel "auto"), every layer is one C++ call
(lminf.decoding.native_stack); elsewhere the model's modules run in fewer, larger calls
(lminf.decoding.modules) around torch's attention kernel.

It computes what the model's forward computes (tests/test_fast_decode.py: to float32 rounding
at every step against the dense float64 reference, before the window fills and across the
ring's wrap; against the forward with a 16-bit cache and with 4-bit weights, to their rounding).
lminf.generation.decoder picks it where it applies, the model's forward elsewhere; a patched
model's `generate` decodes through it the same way (lminf.patching).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from transformers import Cache, PreTrainedModel

from lminf import patching
from lminf.caches.lambda_cache import LambdaCache, LambdaLayer
from lminf.decoding.modules import Head, Layer
from lminf.decoding.native_stack import NativeStack
from lminf.kernels.sdpa import one_query_pass, use_flash
from lminf.rope import rotate, rotation
from lminf.strategies.windowed import WindowedStrategy

# Model types whose decoder layers are Llama's (pre-norm, q/k/v/o projections, full rotary, gated MLP).
LLAMA_SHAPED = ("llama", "mistral", "qwen2")


def why_not(model: PreTrainedModel, cache: Cache, n_global: int | None = None) -> str | None:
    """Why the fast step cannot decode with this model and cache; None when it can."""
    patched = patching.state_of(model)
    if patched is None:
        return "the model is not patched by lminf"
    if model.config.model_type not in LLAMA_SHAPED:
        return f"model type {model.config.model_type!r} is not one of {LLAMA_SHAPED}"
    if patched.replaced:
        return "an attention function replaces the strategy's (lminf.patch's backend)"
    if not all(kind.is_global and kind.rotary for kind in patched.kinds):
        return "the model has sliding or position-free layers"
    strategy = patched.strategy_for(n_global)
    if not isinstance(strategy, WindowedStrategy):
        return f"strategy {strategy.name!r} is not a window with first tokens"
    if strategy.keeps_middle:
        return f"strategy {strategy.name!r} keeps the middle tokens (top-k)"
    if any(strategy.top_k_at(layer) for layer in range(len(patched.kinds))):
        return "top-k middle tokens"
    if not isinstance(cache, LambdaCache) or len(cache.layers) != len(patched.kinds):
        return "the cache is not the strategy's LambdaCache"
    for layer in cache.layers:
        if not isinstance(layer, LambdaLayer) or layer.in_order:
            return "the cache is not the strategy's LambdaCache"
        if (layer.n_global, layer.n_local) != (strategy.n_global, strategy.n_local):
            return "the cache keeps room for padding, or another strategy's sizes"
    if model.training:
        return "the model is in training mode"
    return None


# Per model: (dtype, device, kernel) it was built for, and (its stack or None, its layers, its head).
# They hold the weights as they were: rebuilt after .to().
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: PreTrainedModel, kernel: str) -> tuple[NativeStack | None, list[Layer], Head]:
    built_for = (model.dtype, model.device, kernel)
    if _PLANS.get(model, (None,))[0] != built_for:
        stack = NativeStack.of(model) if kernel == "auto" else None
        layers = [] if stack is not None else [Layer.of(layer, model.config) for layer in model.get_decoder().layers]
        _PLANS[model] = built_for, (stack, layers, Head.of(model))
    return _PLANS[model][1]


class FastStep:
    """token (1, 1) -> logits of the next token (1, vocab), through a patched model's LambdaCache."""

    def __init__(self, model: PreTrainedModel, cache: LambdaCache, n_global: int | None = None):
        reason = why_not(model, cache, n_global)
        if reason is not None:
            raise ValueError(f"the fast decoding step cannot run here: {reason}.")
        patched = patching.state_of(model)
        self.cache = cache
        self.strategy: WindowedStrategy = patched.strategy_for(n_global)
        self.rotary = patched.rotary
        self.embed = model.get_decoder().embed_tokens
        self.stack, self.layers, self.head = _plan(model, patched.kernel)
        self.flash = use_flash(patched.kernel, model.device)

    @property
    def attention_kernel(self) -> str:
        """The kernel its attention runs on: "native" (lminf's C++ kernel), "flash_cpu" (torch's fused CPU kernel) or "torch"."""
        return "native" if self.stack is not None else "flash_cpu" if self.flash else "torch"

    @property
    def layers_kernel(self) -> str:
        """What runs the layers around the attention: "native" (lminf's C++ layers) or "modules"."""
        return "native" if self.stack is not None else "modules"

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the fast decoding step takes one token of one row, shape (1, 1); got {tuple(token.shape)}.")
        pos = self.cache.get_seq_length()
        x = self.embed(token)
        turn = self.rotary(x, torch.tensor([[pos]], device=x.device))  # (cos, sin) (1, 1, D)
        far = self._far(pos, x.device)
        through = self._through_stack if self.stack is not None else self._through_modules
        return self.head.logits(through(x, turn, pos, far))

    def _through_modules(self, x: torch.Tensor, turn, pos: int, far) -> torch.Tensor:
        """x through every layer's modules, each attention one pass of torch's kernel -> x after the last layer."""
        q, k, v = self.layers[0].enter(x, turn)
        for layer, following, cache_layer in zip(self.layers, [*self.layers[1:], None], self.cache.layers, strict=True):
            keys, values = cache_layer.update(k, v)
            with self._seen(keys, values, pos, far) as (keys, values):
                rows = q.reshape(1, keys.shape[1], -1, q.shape[-1])  # grouped query heads as rows of their key head
                attended = one_query_pass(rows, keys, values, layer.scaling, self.flash).to(rows.dtype)
            x = layer.leave(x, attended.reshape(1, -1, rows.shape[-1]))
            if following is not None:
                q, k, v = following.enter(x, turn)
        return x

    def _through_stack(self, x: torch.Tensor, turn, pos: int, far) -> torch.Tensor:
        """x through every layer as one call of lminf's C++ layers (lminf::layers), which write each
        layer's new key and value where the cache made room for them and turn the far keys as the
        attention reads them -> x after the last layer."""
        for cache_layer in self.cache.layers:
            if not cache_layer.is_initialized:  # an empty cache: its storage, in the dtype `update` would store
                empty = x.new_empty(1, self.stack.n_kv, 0, self.stack.head_dim, dtype=cache_layer.kv_dtype or x.dtype)
                cache_layer.lazy_initialization(empty, empty)
        moves = [cache_layer.reserve_one() for cache_layer in self.cache.layers]
        if None in moves:
            raise RuntimeError("the cache's layers are not in one state: some took the token in place, some cannot")
        keys, values = [c.keys for c in self.cache.layers], [c.values for c in self.cache.layers]
        # the attention reads every stored key: the far keys (the first tokens outside the window), then the window
        n_far, far_turn = far
        assert self._start(keys[0].shape[-2], pos) == n_far, (keys[0].shape, pos, n_far)
        return self.stack(x, turn, keys, values, moves, far_turn)

    def _far(self, pos: int, device: torch.device):
        """(first tokens read as far keys, the rotation that moves each such key to where the
        query at its own position sees it at the strategy's distance: (cos, sin), each (n_far, D)),
        shared by the layers; (0, ()) inside the window. RoPE scores depend on the distance only: the strategy puts
        the query at q_at and key j at k_at[j]; key j moved to pos - (q_at - k_at[j]) is seen
        from pos at the same distance, so the query stays as it is and one pass reads every key."""
        n_far = min(self.strategy.n_global, max(0, pos - self.strategy.n_local + 1))
        if not n_far:
            return 0, ()
        q_pos, k_pos = torch.tensor([[pos]], device=device), torch.arange(n_far, device=device)[None]
        q_at, k_at = self.strategy.far_positions(q_pos, k_pos)
        target = q_pos - q_at + (k_pos if k_at is None else k_at)
        cos, sin = rotation(target - k_pos, self.rotary.inv_freq)  # (1, 1, n_far, D)
        return n_far, (cos[0, 0], sin[0, 0])

    def _start(self, stored: int, pos: int) -> int:
        """Where the keys the query at `pos` sees start among `stored` stored ones (with the far keys
        before them, see `_seen`): in order until the cache is full, after the first tokens then."""
        return max(0, pos - self.strategy.n_local + 1) if stored == pos + 1 else self.strategy.n_global

    @contextlib.contextmanager
    def _seen(self, keys, values, pos: int, far):
        """The stored keys (1, Hkv, S, D) and values the query at `pos` sees, as one pass reads them.

        Stored keys are [first n_global | the rest]: in order (positions 0..pos) until the cache
        is full, then the rest is a ring that is exactly the window. Either way they are the
        first tokens outside the window (far keys) and the window: one pass of a fused kernel
        reads them all, the far keys moved (see `_far`) in place for it and put back after."""
        n_far, k_turn = far
        start = self._start(keys.shape[-2], pos)
        if not n_far:
            yield keys[:, :, start:], values[:, :, start:]
            return
        # One token at a time, the cache never returns a dropped key (a full cache takes the
        # new key into its ring), so the far keys are exactly those before the window.
        assert start == n_far, (start, n_far)
        stored = keys[:, :, :n_far].clone()
        try:
            keys[:, :, :n_far] = rotate(stored, k_turn)
            yield keys, values
        finally:
            keys[:, :, :n_far] = stored
