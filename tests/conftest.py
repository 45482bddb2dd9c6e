"""Tiny random-weight models of every supported family, built offline."""

from __future__ import annotations

import pytest
import torch
import transformers

from lminf.kernels import native

# lminf's C++ kernels build where their compiler is (lminf.kernels.native); there a failed build fails the tests.
HAS_CXX = native.has_compiler()

SLIDING_THEN_GLOBAL = ["sliding_attention", "full_attention"]
# Test label -> (config class, settings of its tiny config); a label is a model type, or one with a variant.
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
    "gpt_neox": (transformers.GPTNeoXConfig, {}),  # a quarter of the channels rotate
    "gptj": (transformers.GPTJConfig, {"rotary_dim": 8}),  # half of the channels, interleaved pairs
    "mpt": (
        transformers.MptConfig,
        {"n_heads": 4, "max_seq_len": 64, "attn_config": {"attn_impl": "torch"}},
    ),  # ALiBi, an adapter
    # The model's own sliding layers (window 12: past the test strategies' n_local 8, inside 64 positions).
    "mistral-sliding": (transformers.MistralConfig, {"sliding_window": 12}),  # every layer slides
    "starcoder2": (transformers.Starcoder2Config, {"sliding_window": 12}),
    "gemma2": (  # soft-capped logits (eager: transformers' sdpa cannot soft-cap)
        transformers.Gemma2Config,
        {"head_dim": 16, "sliding_window": 12, "layer_types": SLIDING_THEN_GLOBAL, "attn_implementation": "eager"}
        | {"attn_logit_softcapping": 1.0, "initializer_range": 0.2},  # logits large enough to feel the cap
    ),
    "gemma3_text": (transformers.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 12, "layer_types": SLIDING_THEN_GLOBAL}),
    "olmo3": (transformers.Olmo3Config, {"sliding_window": 12, "layer_types": SLIDING_THEN_GLOBAL}),
    "cohere2": (transformers.Cohere2Config, {"sliding_window": 12, "layer_types": SLIDING_THEN_GLOBAL}),  # global layers NoPE
    "smollm3": (transformers.SmolLM3Config, {"no_rope_layers": [1, 0]}),  # layer 1 is NoPE
    "exaone4": (transformers.Exaone4Config, {"sliding_window": 12, "layer_types": SLIDING_THEN_GLOBAL}),  # global layers NoPE
    "cohere": (transformers.CohereConfig, {}),  # interleaved rotary pairs
    "glm": (transformers.GlmConfig, {}),  # half of the channels, interleaved
    "glm4": (transformers.Glm4Config, {}),
    "olmo": (transformers.OlmoConfig, {}),
    "nemotron": (transformers.NemotronConfig, {}),
    "persimmon": (transformers.PersimmonConfig, {}),
    "arcee": (transformers.ArceeConfig, {}),
    "seed_oss": (transformers.SeedOssConfig, {}),
    "ernie4_5": (transformers.Ernie4_5Config, {}),
    "apertus": (transformers.ApertusConfig, {}),
    "olmoe": (transformers.OlmoeConfig, {"num_experts": 4, "num_experts_per_tok": 2}),
    "granitemoe": (transformers.GraniteMoeConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
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
