"""A decoding step for Llama-shaped models that skips transformers' per-layer machinery.

Why: a decoding step is one token through every layer, and on a CPU part of its time is
per-call overhead: the model's forward makes about 110 torch calls a layer
(mask and position plumbing, the rotary embedding, our Layout, one attention pass per key
set and their merge). This step runs the same modules (norms, projections, MLP, output
layer, rotary embedding) and the same cache, with the attention of the one query written
directly: a pass over the window and one over the first tokens read at their far positions,
merged as one softmax (lminf.kernels.sdpa).

It computes what the model's forward computes (tests/test_fast_decode.py: to float32 rounding
at every step against the dense float64 reference, before the window fills and across the
ring's wrap; against the forward with a 16-bit cache and with 4-bit weights, to their rounding).
It was 1.1-1.2x faster than the forward per step on a 2-core CPU (README, Faster decoding on a
CPU). lminf.generation.decoder picks it where it applies, the model's forward elsewhere.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lminf.caches.lambda_cache import LambdaCache, LambdaLayer
from lminf.kernels.sdpa import attend, merge, use_flash
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
    if not isinstance(strategy, WindowedStrategy) or strategy.keeps_middle:
        return f"strategy {strategy.name!r} is not a window with first tokens"
    if any(strategy.top_k_at(layer) for layer in range(len(state.kinds))):
        return "top-k middle tokens"
    if not isinstance(cache, LambdaCache) or len(cache.layers) != len(state.kinds):
        return "the cache is not the strategy's LambdaCache"
    for layer in cache.layers:
        if not isinstance(layer, LambdaLayer) or layer.in_order:
            return "the cache is not the strategy's LambdaCache"
        if (layer.n_sink, layer.n_local) != (strategy.n_global, strategy.n_local):
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
        self.embed, self.layers, self.norm = decoder.embed_tokens, decoder.layers, decoder.norm
        self.head = model.get_output_embeddings()
        self.flash = use_flash(state.kernel, model.device)

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the fast decoding step takes one token of one row, shape (1, 1); got {tuple(token.shape)}.")
        pos = self.cache.get_seq_length()
        x = self.embed(token)
        cos, sin = self.rotary(x, torch.tensor([[pos]], device=x.device))
        far = self._far(pos, x.device)
        for layer, cache_layer in zip(self.layers, self.cache.layers, strict=True):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache_layer.update(k, v)
            o = self._attend(q, keys, values, pos, far, attn.scaling)
            x = x + attn.o_proj(o.reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.head(self.norm(x))[:, -1].float()

    def _far(self, pos: int, device: torch.device):
        """(first tokens read as far keys, rotation of the query to its far position, of each
        such key to its own), shared by the layers; (0, None, None) inside the window."""
        n_far = min(self.strategy.n_global, max(0, pos - self.strategy.n_local + 1))
        if not n_far:
            return 0, None, None
        q_pos, k_pos = torch.tensor([[pos]], device=device), torch.arange(n_far, device=device)[None]
        q_at, k_at = self.strategy.far_positions(q_pos, k_pos)
        q_turn = rotation(q_at - q_pos, self.inv_freq)
        k_turn = None if k_at is None else rotation(k_at - k_pos, self.inv_freq)
        return n_far, q_turn, k_turn

    def _attend(self, q, keys, values, pos: int, far, scaling: float) -> torch.Tensor:
        """One query (1, Hq, 1, D) over the stored keys (1, Hkv, S, D) -> (1, Hq, D).

        Stored keys are [first n_sink | the rest]: in order (positions 0..pos) until the cache
        is full, then the rest is a ring that is exactly the window. First tokens outside the
        window are far keys; in-order keys past them but before the window are dropped middle
        keys. The window is one pass of torch's fused kernel (on CPU: it splits the heads over
        the threads, where a batched matmul of three rows does not), the far keys another."""
        n_far, q_turn, k_turn = far
        hkv, d = keys.shape[1], q.shape[-1]
        start = max(0, pos - self.strategy.n_local + 1) if keys.shape[-2] == pos + 1 else self.strategy.n_global
        rows = q.reshape(1, hkv, -1, d)  # grouped query heads as rows of their key head
        parts = [attend(rows, keys[:, :, start:], values[:, :, start:], None, scaling, self.flash)]
        if n_far:
            q_far = rotate(q, q_turn).reshape(1, hkv, -1, d)
            k_far = keys[:, :, :n_far] if k_turn is None else rotate(keys[:, :, :n_far], k_turn)
            parts.append(attend(q_far, k_far, values[:, :, :n_far], None, scaling, self.flash))
        return merge(parts).to(q.dtype).reshape(1, -1, d)
