"""A decoding step for Llama-shaped models that skips transformers' per-layer machinery.

Why: a decoding step is one token through every layer, and on a CPU part of its time is
per-call overhead: the model's forward makes about 110 torch calls a layer
(mask and position plumbing, the rotary embedding, our Layout, one attention pass per key
set and their merge). This step runs the same modules (norms, projections, MLP, output
layer, rotary embedding) and the same cache, with the attention of the one query written
directly: one pass of the fused kernel over the window and the first tokens, those moved to
where the query sees them at the strategy's distance (no second pass, no merge).

It computes what the model's forward computes (tests/test_fast_decode.py: to float32 rounding
at every step against the dense float64 reference, before the window fills and across the
ring's wrap; against the forward with a 16-bit cache and with 4-bit weights, to their rounding).
With the default model's 4-bit weights, `generate` through it was 1.6x (1k context) and 1.2x
(8k) faster than through the forward on a 2-core CPU; 1.1-1.2x with float32 weights (README,
Faster decoding on a CPU; benchmarks/generate_ab.py). With kernel "compiled" the layers around the
attention run as compiled graphs instead of the modules (lminf.kernels.decode_layers); with float32
or 4-bit weights on a CPU in kernel "auto", as lminf's C++ layers (lminf.kernels.native,
decode_layer_cpu.cpp: float32 0.81x / 0.91x the time per token at 1k / 8k with two calls a layer;
then every layer in one call, `_NativeStack`, which writes the caches too: 0.85x / 0.88x of that).
lminf.generation.decoder picks it where it applies, the model's forward elsewhere; a patched
model's `generate` decodes through it the same way (lminf.patching).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

from lminf.caches.lambda_cache import LambdaCache, LambdaLayer
from lminf.kernels import decode_layers, native
from lminf.kernels.compiling import compiles
from lminf.kernels.int4 import Int4Linear
from lminf.kernels.one_query import COMPILED, compiled_pass, native_pass, prepare
from lminf.kernels.sdpa import one_query_pass, use_flash
from lminf.rope import rotate, rotation
from lminf.strategies.windowed import WindowedStrategy

# Model types whose decoder layers are Llama's (pre-norm, q/k/v/o projections, full rotary, gated MLP).
FAMILIES = ("llama", "mistral", "qwen2")


def why_not(model: PreTrainedModel, cache: Cache, n_global: int | None = None) -> str | None:
    """Why the fast step cannot decode with this model and cache; None when it can."""
    state = getattr(model, "_lminf", None)
    if state is None:
        return "the model is not patched by lminf"
    if model.config.model_type not in FAMILIES:
        return f"model type {model.config.model_type!r} is not one of {FAMILIES}"
    if state.backend is not None:
        return "an attention function replaces the strategy's (lminf.patch's backend)"
    if not all(kind.is_global and kind.rotary for kind in state.kinds):
        return "the model has sliding or position-free layers"
    strategy = state.strategy_for(n_global)
    if not isinstance(strategy, WindowedStrategy):
        return f"strategy {strategy.name!r} is not a window with first tokens"
    if strategy.keeps_middle:
        return f"strategy {strategy.name!r} keeps the middle tokens (top-k)"
    if any(strategy.top_k_at(layer) for layer in range(len(state.kinds))):
        return "top-k middle tokens"
    if not isinstance(cache, LambdaCache) or len(cache.layers) != len(state.kinds):
        return "the cache is not the strategy's LambdaCache"
    for layer in cache.layers:
        if not isinstance(layer, LambdaLayer) or layer.in_order:
            return "the cache is not the strategy's LambdaCache"
        if (layer.n_global, layer.n_local) != (strategy.n_global, strategy.n_local):
            return "the cache keeps room for padding, or another strategy's sizes"
    if model.training:
        return "the model is in training mode"
    return None


class FastStep:
    """token (1, 1) -> logits of the next token (1, vocab), through a patched model's LambdaCache."""

    def __init__(self, model: PreTrainedModel, cache: LambdaCache, n_global: int | None = None):
        reason = why_not(model, cache, n_global)
        if reason is not None:
            raise ValueError(f"the fast decoding step cannot run here: {reason}.")
        state = model._lminf
        self.cache = cache
        self.strategy: WindowedStrategy = state.strategy_for(n_global)
        self.rotary = state.rotary
        self.inv_freq = state.rotary.inv_freq
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens
        self.compiled = state.kernel == COMPILED
        # lminf's C++ layers (lminf.kernels.native) for float32 or 4-bit weights on a CPU in kernel "auto", where they build
        native_layers = state.kernel == "auto" and _NativeLayer.fits(model) and native.layers() is not None
        # A plan holds the weights as they were: rebuild after .to(); kernel "compiled" has its own.
        built_for = (model.dtype, model.device, self.compiled, native_layers)
        if _PLANS.get(model, (None,))[0] != built_for:
            _PLANS[model] = built_for, _plan(model, self.compiled, native_layers)
        self.layers, self.head = _PLANS[model][1]
        self.flash = use_flash(state.kernel, model.device)
        # lminf's C++ kernel for a float32 query on a CPU (lminf.kernels.native), where it builds: kernel
        # "auto" calls it here, kernel "compiled" inside its graphs (lminf.kernels.one_query reads what this found)
        native_attention = model.device.type == "cpu" and model.dtype == torch.float32 and prepare()
        self.native = native_attention and state.kernel == "auto"
        # with lminf's C++ layers and attention, every layer in one call (its caches written there too)
        self.stack = _NativeStack.of(self.layers) if self.native and isinstance(self.layers[0], _NativeLayer) else None

    @property
    def attention_kernel(self) -> str:
        """The kernel its attention runs on: "compiled", "native" (lminf's C++ kernel), "flash_cpu"
        (torch's fused CPU kernel) or "torch"."""
        if self.compiled and compiles():
            return COMPILED
        return "native" if self.native else "flash_cpu" if self.flash else "torch"

    @property
    def layers_kernel(self) -> str:
        """What runs the layers around the attention: "compiled" (lminf.kernels.decode_layers), "native"
        (lminf's C++ layers, decode_layer_cpu.cpp) or "modules"."""
        if isinstance(self.head, _CompiledHead) and compiles():
            return COMPILED
        return "native" if isinstance(self.layers[0], _NativeLayer) else "modules"

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the fast decoding step takes one token of one row, shape (1, 1); got {tuple(token.shape)}.")
        pos = self.cache.get_seq_length()
        x = self.embed(token)
        cos, sin = self.rotary(x, torch.tensor([[pos]], device=x.device))
        half = cos.shape[-1] // 2
        turn = cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)  # x * cos + rotate_half(x) * sin, in 4 calls
        far = self._far(pos, x.device)
        if self.stack is not None and self.cache.layers[0].is_initialized:
            return self.head.logits(self._through_stack(x, turn, pos, far))
        # lminf's C++ kernel turns the far keys as it reads them; elsewhere `_seen` turns them in place
        turns_far = self.native and far[0] > 0
        attend = functools.partial(self._pass, far=far[1]) if turns_far else self._pass
        layers = self.layers
        q, k, v = layers[0].enter(x, turn)
        for layer, following, cache_layer in zip(layers, [*layers[1:], None], self.cache.layers, strict=True):
            keys, values = cache_layer.update(k, v)
            with self._seen(keys, values, pos, far, in_place=not turns_far) as (keys, values):
                rows = q.reshape(1, keys.shape[1], -1, q.shape[-1])  # grouped query heads as rows of their key head
                if following is None:
                    return self.head.after(layer, x, attend(rows, keys, values, layer.scaling))
                # this layer's attention and end, the next one's start: one call where compiled
                x, q, k, v = layer.attend_leave_enter(attend, rows, keys, values, x, turn, following)

    def _through_stack(self, x: torch.Tensor, turn, pos: int, far) -> torch.Tensor:
        """x through every layer as one call of lminf's C++ layers (lminf::layers), which write each
        layer's new key and value where the cache made room for them and turn the far keys as the
        attention reads them -> x after the last layer."""
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
        cos, sin = rotation(target - k_pos, self.inv_freq)  # (1, 1, n_far, D)
        return n_far, (cos[0, 0], sin[0, 0])

    def _start(self, stored: int, pos: int) -> int:
        """Where the keys the query at `pos` sees start among `stored` stored ones (with the far keys
        before them, see `_seen`): in order until the cache is full, after the first tokens then."""
        return max(0, pos - self.strategy.n_local + 1) if stored == pos + 1 else self.strategy.n_global

    @contextlib.contextmanager
    def _seen(self, keys, values, pos: int, far, in_place: bool = True):
        """The stored keys (1, Hkv, S, D) and values the query at `pos` sees, as one pass reads them.

        Stored keys are [first n_sink | the rest]: in order (positions 0..pos) until the cache
        is full, then the rest is a ring that is exactly the window. Either way they are the
        first tokens outside the window (far keys) and the window: one pass of a fused kernel
        reads them all, the far keys moved (see `_far`) in place for it and put back after
        (`in_place`), or as stored for a kernel that moves them as it reads them."""
        n_far, k_turn = far
        start = self._start(keys.shape[-2], pos)
        if not n_far:
            yield keys[:, :, start:], values[:, :, start:]
            return
        # One token at a time, the cache never returns a dropped key (a full cache takes the
        # new key into its ring), so the far keys are exactly those before the window.
        assert start == n_far, (start, n_far)
        if not in_place:
            yield keys, values
            return
        stored = keys[:, :, :n_far].clone()
        try:
            keys[:, :, :n_far] = rotate(stored, k_turn)
            yield keys, values
        finally:
            keys[:, :, :n_far] = stored

    def _pass(self, rows, keys, values, scaling: float, far: tuple = ()) -> torch.Tensor:
        """rows (1, Hkv, rep, D) over keys and values (1, Hkv, S, D) -> (1, Hq, D); the query sees itself, so S > 0.
        far: () or the far keys' rotation (cos, sin (n_far, D)) for lminf's C++ kernel to turn the first n_far."""
        if far:
            return native_pass(rows, keys, values, scaling, far).reshape(1, -1, rows.shape[-1])
        out = compiled_pass(rows, keys, values, scaling) if self.compiled else None
        if out is None and self.native:
            out = native_pass(rows, keys, values, scaling)
        if out is None:
            out = one_query_pass(rows, keys, values, scaling, self.flash)
        return out.to(rows.dtype).reshape(1, -1, rows.shape[-1])


def compiled_layers_fit(model: PreTrainedModel) -> bool:
    """Whether kernel "compiled" runs this model's layers as compiled graphs too
    (lminf.kernels.decode_layers: float32 or float64 nn.Linear weights on a CPU or 4-bit
    Int4Linear layers, Llama's norms and gated MLP), not only its decoding attention."""
    return model.config.model_type in FAMILIES and _CompiledLayer.fits(model)


# Per model: (dtype, device, compiled) it was built for, (its layers, its head) as a step runs them (_plan).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: PreTrainedModel, compiled: bool, native_layers: bool) -> tuple[list, _Head | _CompiledHead]:
    """What a step runs in each decoder layer and for the output: compiled graphs
    (lminf.kernels.decode_layers) where asked and every layer fits them, lminf's C++ layers
    where asked, the modules elsewhere."""
    decoder, config = model.get_decoder(), model.config
    if compiled and compiled_layers_fit(model):
        layers = [_CompiledLayer.of(layer, config) for layer in decoder.layers]
        return layers, _CompiledHead(decoder.norm.weight, _weights(model.get_output_embeddings()), decoder.norm.variance_epsilon)
    head = _Head(_norm(decoder.norm), model.get_output_embeddings())
    if native_layers:
        return [_NativeLayer.of(layer, config, native.layers()) for layer in decoder.layers], head
    return [_Layer.of(layer, config) for layer in decoder.layers], head


@dataclass
class _Layer:
    """One decoder layer as the step runs it: fewer, larger calls than its modules make."""

    norm1: Callable
    qkv: Callable  # h (1, 1, hidden) -> [q | k | v]
    o_proj: torch.nn.Module
    norm2: Callable
    gate_up: Callable  # h -> [gate | up]
    act: Callable
    down: torch.nn.Module
    n_q: int  # query heads
    n_qk: int  # channels of q and k
    head_dim: int
    scaling: float

    def enter(self, x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]):
        """x (1, 1, hidden) -> query (1, Hq, D), key and value (1, Hkv, 1, D), rotated."""
        qkv = self.qkv(self.norm1(x))  # (1, 1, [q | k | v])
        qk = _rope(qkv[..., : self.n_qk].view(1, -1, self.head_dim), turn)  # q's and k's heads, rotated together
        return qk[:, : self.n_q], qk[:, self.n_q :, None], qkv[..., self.n_qk :].view(1, -1, 1, self.head_dim)

    def leave(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x and the attention's output (1, Hq, D) -> x after the layer."""
        x = x + self.o_proj(attended.reshape(1, 1, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(self.act(gate) * up)

    def attend_leave_enter(self, attend: Callable, rows, keys, values, x: torch.Tensor, turn, following: _Layer):
        """attend(rows, keys, values, scaling), leave, then the following layer's enter -> (x, query, key, value)."""
        x = self.leave(x, attend(rows, keys, values, self.scaling))
        return x, *following.enter(x, turn)

    @classmethod
    def of(cls, layer: torch.nn.Module, config) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        n_q = config.num_attention_heads
        return cls(
            norm1=_norm(layer.input_layernorm),
            qkv=_side_by_side([attn.q_proj, attn.k_proj, attn.v_proj]),
            o_proj=attn.o_proj,
            norm2=_norm(layer.post_attention_layernorm),
            gate_up=_side_by_side([mlp.gate_proj, mlp.up_proj]),
            act=mlp.act_fn,
            down=mlp.down_proj,
            n_q=n_q,
            n_qk=(n_q + config.num_key_value_heads) * attn.head_dim,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
        )


@dataclass
class _NativeLayer:
    """One decoder layer as lminf's C++ layer runs it (decode_layer_cpu.cpp): its `enter` and
    `leave`, each one call of plain loops around torch's products (not ~130 torch calls)."""

    ops: object  # torch.ops.lminf
    before: tuple  # enter's arguments after x: norm, eps, the q, k, v products (native_products)
    after: tuple  # leave's arguments after x and the attention's output: norm, eps, o, gate and up, down
    scaling: float
    n_q: int
    head_dim: int

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """Whether every layer is what the C++ layer computes: float32 nn.Linear or 4-bit Int4Linear
        products on a CPU (Llama's family, float32 activations), Llama's RMSNorm, a SiLU-gated MLP."""
        linears = [m for layer in model.get_decoder().layers for m in layer.modules() if "Linear" in type(m).__name__]
        float32 = [m for m in linears if not isinstance(m, Int4Linear)]
        plain = all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in float32)
        return plain and model.dtype == torch.float32 and model.config.model_type in FAMILIES and _CompiledLayer.fits(model)

    @classmethod
    def of(cls, layer: torch.nn.Module, config, ops) -> _NativeLayer:
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        qkv = native_products(_joined([attn.q_proj, attn.k_proj, attn.v_proj]))
        rest = native_products([attn.o_proj, *_joined([mlp.gate_proj, mlp.up_proj]), mlp.down_proj])
        before = (norm1.weight, norm1.variance_epsilon, *qkv)
        after = (norm2.weight, norm2.variance_epsilon, *rest)
        return cls(ops, before, after, attn.scaling, config.num_attention_heads, attn.head_dim)

    def enter(self, x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]):
        return self.ops.enter(x, *self.before, *turn, self.n_q, self.head_dim)

    def leave(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.ops.leave(x, attended, *self.after)

    def attend_leave_enter(self, attend: Callable, rows, keys, values, x: torch.Tensor, turn, following: _NativeLayer):
        x = self.leave(x, attend(rows, keys, values, self.scaling))
        return x, *following.enter(x, turn)


@dataclass
class _NativeStack:
    """Every decoder layer of a step as one call of lminf's C++ layers (lminf::layers in
    decode_layer_cpu.cpp): no Python between the layers."""

    ops: object  # torch.ops.lminf
    weights: tuple  # layers()' norms, eps, then the products' tensors, counts, groups, biases and per_layer
    scaling: float
    n_q: int
    head_dim: int

    @classmethod
    def of(cls, layers: list[_NativeLayer]) -> _NativeStack:
        norms, eps, tensors, counts, groups, biases, per_layer = [], [], [], [], [], [], []
        for layer in layers:
            for norm, epsilon, *products in (layer.before, layer.after):
                norms.append(norm)
                eps.append(epsilon)
                for into, part in zip((tensors, counts, groups, biases), products, strict=True):
                    into += part
                per_layer.append(len(products[1]))
        first = layers[0]
        return cls(first.ops, (norms, eps, tensors, counts, groups, biases, per_layer), first.scaling, first.n_q, first.head_dim)

    def __call__(self, x: torch.Tensor, turn, keys: list, values: list, moves: list[int], far_turn: tuple) -> torch.Tensor:
        """x (1, 1, hidden) -> x after every layer; keys[i] and values[i] (1, Hkv, S, D) take layer i's
        new key and value last (the newest stored ones moved to row moves[i] first, where >= 0);
        far_turn: () or (cos, sin) (n_far, D), the rotation of the first n_far keys as they are read."""
        cos, signed_sin = turn
        return self.ops.layers(
            x, cos, signed_sin, *self.weights, keys, values, moves, self.scaling, self.n_q, self.head_dim, *far_turn
        )


def native_products(linears: list[torch.nn.Module]) -> tuple[list, list[int], list[int], list]:
    """Products as decode_layer_cpu.cpp reads them: (tensors, counts, groups, biases): per product its
    tensors (a float weight; or per part of a 4-bit layer its packed codes and scales), how many,
    its 4-bit group (0: float) and its bias or None."""
    tensors, counts, groups, biases = [], [], [], []
    for linear in linears:
        if isinstance(linear, Int4Linear):
            weights = linear.weights()
            own = [t for part in zip(weights.packed, weights.scale_zero, strict=True) for t in part]
            group, bias = weights.group, weights.bias
        else:
            own, group, bias = [linear.weight], 0, linear.bias
        tensors += own
        counts.append(len(own))
        groups.append(group)
        biases.append(bias)
    return tensors, counts, groups, biases


def _joined(linears: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """4-bit layers as one (their codes shared: one kernel call) where they fit, the layers elsewhere."""
    return [Int4Linear.side_by_side(linears)] if Int4Linear.fit_side_by_side(linears) else linears


_FLOATS = (torch.float32, torch.float64)  # the float weights the compiled graphs were measured and tested with


@dataclass
class _CompiledLayer:
    """One decoder layer as compiled graphs around its attention (lminf.kernels.decode_layers):
    the first layer's enter, then each layer's leave joined with the next one's enter."""

    before: tuple  # enter's arguments after x and the rotation
    after: tuple  # leave's arguments after x and the attention's output
    scaling: float

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        """Whether every layer is what the graphs compute: float CPU weights in nn.Linear or 4-bit
        Int4Linear layers, Llama's RMSNorm, a SiLU-gated MLP."""
        decoder = model.get_decoder()
        linears = [model.get_output_embeddings()]
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if type(mlp.act_fn) is not torch.nn.SiLU and type(mlp.act_fn).__name__ != "SiLUActivation":  # transformers' own
                return False
        norms = [decoder.norm] + [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        floats = [m for m in linears if not isinstance(m, Int4Linear)]
        plain = all(type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in _FLOATS for m in floats)
        return plain and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms)

    @classmethod
    def of(cls, layer: torch.nn.Module, config) -> _CompiledLayer:
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        n_q = config.num_attention_heads
        n_qk = (n_q + config.num_key_value_heads) * attn.head_dim
        qkv = _weights_side_by_side([attn.q_proj, attn.k_proj, attn.v_proj])
        before = (norm1.weight, qkv, norm1.variance_epsilon, n_q, n_qk, attn.head_dim)
        gate_up = _weights_side_by_side([mlp.gate_proj, mlp.up_proj])
        after = (_weights(attn.o_proj), norm2.weight, gate_up, _weights(mlp.down_proj), norm2.variance_epsilon)
        return cls(before, after, attn.scaling)

    def enter(self, x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]):
        return decode_layers.compiled_enter(x, *turn, *self.before)

    def attend_leave_enter(self, attend: Callable, rows, keys, values, x: torch.Tensor, turn, following: _CompiledLayer):
        """The compiled attention, leave and the following layer's enter as one graph; `attend`
        (torch's fused kernel) and the two graphs once compiling failed."""
        if compiles():
            step = decode_layers.compiled_attend_leave_enter
            return step(rows, keys, values, self.scaling, x, self.after, *turn, following.before)
        attended = attend(rows, keys, values, self.scaling)
        return decode_layers.compiled_leave_enter(x, attended, self.after, *turn, following.before)


@dataclass
class _Head:
    """The final norm and output layer, as modules."""

    norm: Callable
    output: torch.nn.Module

    def after(self, layer: _Layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The last layer's leave, then the next token's logits (1, vocab), float32."""
        return self.logits(layer.leave(x, attended))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x after the last layer -> the next token's logits (1, vocab), float32."""
        return self.output(self.norm(x))[:, -1].float()


@dataclass
class _CompiledHead:
    """The last layer's leave, the final norm and the output layer as one compiled graph."""

    norm: torch.Tensor
    output: decode_layers.Linear
    eps: float

    def after(self, layer: _CompiledLayer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return decode_layers.compiled_leave_head(x, attended, layer.after, self.norm, self.output, self.eps)


def _weights(linear: torch.nn.Module) -> decode_layers.Linear:
    return linear.weights() if isinstance(linear, Int4Linear) else (linear.weight, linear.bias)


def _weights_side_by_side(linears: list[torch.nn.Module]) -> tuple[decode_layers.Linear, ...]:
    """What decode_layers.side_by_side reads: the weights of `_joined(linears)`."""
    return tuple(_weights(linear) for linear in _joined(linears))


def _norm(module: torch.nn.Module) -> Callable:
    """The model's RMSNorm as torch's one call where it is the same sum (float32 weights: the
    module computes in float32 anyway); the module itself elsewhere."""
    eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
    if eps is None or weight is None or weight.dtype != torch.float32:
        return module
    return functools.partial(torch.nn.functional.rms_norm, normalized_shape=weight.shape, weight=weight, eps=eps)


def _side_by_side(linears: list[torch.nn.Module]) -> Callable:
    """h -> the layers' outputs concatenated, through `_joined(linears)`: one call for 4-bit layers
    where they fit, the layers one after the other elsewhere (a float copy of the weights
    side by side would cost memory)."""
    joined = _joined(linears)
    return joined[0] if len(joined) == 1 else lambda h: torch.cat([linear(h) for linear in joined], -1)


def _rope(x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (1, H, D) rotated: x * cos + rotate_half(x) * sin, with turn = (cos, sin with its first half negated)."""
    cos, signed_sin = turn
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
