"""Which model families lminf can patch, and where their attention pieces live.

Every supported family routes attention through transformers' attention interface, has
one rotary embedding module (its `inv_freq` moves with the model) and one attention
module per layer (`layer_idx`, `head_dim`).
"""

from __future__ import annotations

import importlib

import torch
from transformers import PretrainedConfig, PreTrainedModel

# Decoder families whose attention layers are checked against the reference in the tests.
SUPPORTED_MODEL_TYPES = (
    *("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "granite", "stablelm", "phi"),
    *("mixtral", "qwen2_moe", "qwen3_moe"),  # mixtures of experts: the attention is a plain rotary one
)
# RoPE variants whose frequencies do not change with the input length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_supported(model: PreTrainedModel) -> None:
    check_config(model.config)


def check_config(config: PretrainedConfig) -> None:
    """A clear error unless lminf supports this model configuration."""
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


def rotary_embedding(model: PreTrainedModel) -> torch.nn.Module:
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]
    if len(rotaries) != 1:
        raise ValueError(f"lminf expects one rotary embedding module in the model, found {len(rotaries)}.")
    return rotaries[0]


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if len(modules) != model.config.num_hidden_layers:
        raise ValueError(
            f"lminf found {len(modules)} attention layers, expected {model.config.num_hidden_layers}; "
            "this model's layout is not supported."
        )
    return modules


def rotary_inv_freq(config: PretrainedConfig) -> torch.Tensor:
    """The rotary frequencies a model of this configuration uses, computed by its own
    transformers rotary class (for engines that build the model themselves, e.g. vLLM)."""
    check_config(config)
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    return rotary(config).inv_freq
