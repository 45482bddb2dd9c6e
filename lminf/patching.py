"""Plugging Lambda attention into a transformers model.

Everything goes through transformers' public extension points:
- `AttentionInterface.register("lminf", ...)`: our attention function, called by every
  attention layer with rotated queries and keys;
- `AttentionMaskInterface.register("lminf", ...)`: instead of an n x n mask it returns
  a `Layout` (positions of queries and keys, see lminf.layout);
- `LambdaCache` (a `Cache`), which `model.generate` gets by default after `patch`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from lminf.caches.lambda_cache import LambdaCache
from lminf.kernels.lambda_blocks import GLOBAL_DISTANCES, lambda_attention
from lminf.layout import Layout, lambda_mask

IMPLEMENTATION = "lminf"
# Decoder families whose attention layers are checked against the reference in the tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# RoPE variants whose frequencies do not change with the input length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

Backend = Callable[..., torch.Tensor]
PREFILL_CHUNK = 2048  # prompt tokens per forward call when generate() fills the cache


@dataclass(frozen=True)
class LambdaSettings:
    n_global: int
    n_local: int
    top_k: int
    top_k_from_layer: int
    global_distance: str = "capped"


@dataclass
class _PatchState:
    settings: LambdaSettings
    rotary: torch.nn.Module  # the model's rotary embedding: its inv_freq moves with the model
    backend: Backend
    previous_implementation: str


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
    s = state.settings
    # A forward call may pin a longer prefix as global (e.g. a chat's system prompt).
    n_global = kwargs.get("lminf_n_global")
    out = state.backend(
        query,
        key,
        value,
        attention_mask,
        n_global=s.n_global if n_global is None else n_global,
        n_local=s.n_local,
        top_k=s.top_k if module.layer_idx >= s.top_k_from_layer else 0,
        inv_freq=state.rotary.inv_freq,
        scaling=module.head_dim**-0.5 if scaling is None else scaling,
        global_distance=s.global_distance,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, lminf_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, lambda_mask)


def patch(
    model: PreTrainedModel,
    n_global: int = 10,
    n_local: int | None = None,
    top_k: int = 0,
    top_k_from_layer: int = 4,
    backend: Backend | None = None,
    global_distance: str = "capped",
) -> PreTrainedModel:
    """Switch `model` to LM-Infinite's Lambda attention, in place; returns the model.

    n_global: first tokens every query attends to (attention sinks), seen at distance n_local.
    n_local: most recent tokens every query attends to; default config.max_position_embeddings.
    top_k: middle tokens each query head also attends to, in layers >= top_k_from_layer
        (0 disables; with top_k > 0 the generation cache keeps every token).
    backend: the attention function; default lminf.attention.lambda_attention.
    global_distance: "capped" (LM-Infinite) or "reindexed" (the StreamingLLM baseline: global
        tokens at their distance inside a re-indexed [n_global | n_local] cache; no top_k).
    """
    if getattr(model, "_lminf", None) is not None:
        raise RuntimeError("this model is already patched by lminf; call lminf.unpatch(model) first.")
    config = model.config
    _check_supported(model)
    n_local = config.max_position_embeddings if n_local is None else n_local
    num_layers = config.num_hidden_layers
    if n_local < 1:
        raise ValueError(f"n_local must be >= 1, got {n_local}.")
    if n_global < 0:
        raise ValueError(f"n_global must be >= 0, got {n_global}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}.")
    if global_distance not in GLOBAL_DISTANCES or (global_distance == "reindexed" and top_k):
        raise ValueError(f"global_distance must be one of {GLOBAL_DISTANCES} (reindexed needs top_k=0), got {global_distance!r}.")
    if top_k and not 0 <= top_k_from_layer < num_layers:
        raise ValueError(
            f"top_k={top_k} has no room: top_k_from_layer={top_k_from_layer} but the model's layers are 0..{num_layers - 1}."
        )
    state = _PatchState(
        settings=LambdaSettings(n_global, n_local, top_k, top_k_from_layer, global_distance),
        rotary=_rotary_embedding(model),
        backend=backend or lambda_attention,
        previous_implementation=config._attn_implementation,
    )
    for module in _attention_modules(model):
        module._lminf = state
    model._lminf = state
    model.set_attn_implementation(IMPLEMENTATION)
    model.generate = _generate_with_lambda_cache(model)
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `patch`: restore the previous attention implementation and plain `generate`."""
    state = getattr(model, "_lminf", None)
    if state is None:
        raise RuntimeError("this model is not patched by lminf.")
    for module in _attention_modules(model):
        del module._lminf
    del model._lminf
    del model.generate  # the instance attribute; the class method shows through again
    model.set_attn_implementation(state.previous_implementation)
    return model


def settings_of(model: PreTrainedModel) -> LambdaSettings:
    state = getattr(model, "_lminf", None)
    if state is None:
        raise RuntimeError("this model is not patched by lminf; call lminf.patch(model) first.")
    return state.settings


def make_cache(model: PreTrainedModel, attention_mask: torch.Tensor | None = None, n_global: int | None = None) -> LambdaCache:
    """A bounded cache for a patched model. Pass the prompt's 2D attention_mask when the
    batch is left-padded: the sink region grows by the padding so every row keeps its
    own first n_global tokens. `n_global` overrides the model's setting; pass the same
    value as `lminf_n_global=` to every forward call that uses this cache."""
    s = settings_of(model)
    n_global = s.n_global if n_global is None else n_global
    left_pad = 0
    if attention_mask is not None:
        left_pad = int((attention_mask.cumsum(-1) == 0).sum(-1).max())
    return LambdaCache(
        model.config.num_hidden_layers,
        n_sink=n_global + left_pad,
        n_local=None if s.top_k else s.n_local,
    )


def _generate_with_lambda_cache(model: PreTrainedModel) -> Callable:
    original = type(model).generate.__get__(model)

    @functools.wraps(original)
    def generate(*args, prefill_chunk: int = PREFILL_CHUNK, **kwargs):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}.")
        if kwargs.get("past_key_values") is None:
            mask = kwargs.get("attention_mask")
            cache = kwargs["past_key_values"] = make_cache(model, mask)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1] - 1 > prefill_chunk:
                prefill(model, ids[:, :-1], cache, None if mask is None else mask[:, :-1], prefill_chunk)
        return original(*args, **kwargs)  # generate() runs only the tokens the cache has not seen

    return generate


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = PREFILL_CHUNK,
    progress: bool = False,
) -> None:
    """Feed `input_ids` through `cache` `chunk_size` tokens at a time, so activation memory
    stays bounded whatever the length. Positions follow generate()'s rule for padded rows."""
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    n = input_ids.shape[1]
    bar = tqdm(total=n, desc="prefill", unit="tok", file=sys.stderr, disable=not progress)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        model(
            input_ids[:, a:b],
            attention_mask=None if attention_mask is None else attention_mask[:, :b],
            position_ids=None if position_ids is None else position_ids[:, a:b],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        bar.update(b - a)
    bar.close()


def _check_supported(model: PreTrainedModel) -> None:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"lminf does not support model type {model_type!r}. Supported rotary-position decoders: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Models without rotary positions (GPT-2, ...) cannot be patched."
        )
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"lminf does not support rope_type {rope_type!r} (its frequencies change with input length); "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"lminf supports only full-attention layers; this model has layer types {sorted(set(layer_types))}.")


def _rotary_embedding(model: PreTrainedModel) -> torch.nn.Module:
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]
    if len(rotaries) != 1:
        raise ValueError(f"lminf expects one rotary embedding module in the model, found {len(rotaries)}.")
    return rotaries[0]


def _attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if len(modules) != model.config.num_hidden_layers:
        raise ValueError(
            f"lminf found {len(modules)} attention layers, expected {model.config.num_hidden_layers}; "
            "this model's layout is not supported."
        )
    return modules
