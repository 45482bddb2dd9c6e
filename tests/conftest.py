"""Tiny random-weight models of every supported family, built offline."""

from __future__ import annotations

import pytest
import torch
import transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "phi3": (transformers.Phi3Config, {"partial_rotary_factor": 0.5}),  # only half the channels rotate
    "gemma": (transformers.GemmaConfig, {"head_dim": 16}),
    "olmo2": (transformers.Olmo2Config, {}),  # norms on q and k before the rotation
    "granite": (transformers.GraniteConfig, {"attention_multiplier": 0.2}),  # its own attention scale
    "stablelm": (transformers.StableLmConfig, {}),  # a quarter of the channels rotate
    "phi": (transformers.PhiConfig, {}),  # half of the channels rotate
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    ),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    config_class, extra = FAMILIES[family]
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = config_class(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param
