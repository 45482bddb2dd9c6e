"""What many test modules share: tiny random-weight models of every supported family (built offline),
random token ids, the float32 tolerance, decoding one token at a time, and the CLI in a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import torch
import transformers

import lminf
from lminf.generation import cache_kwarg, decoder

FP32 = dict(rtol=1e-4, atol=1e-4)  # float32 against float32 or float64: rounding, not a bug

SLIDING_THEN_GLOBAL = ["sliding_attention", "full_attention"]
# Test label -> (config class, settings of its tiny config); a label is a model type, or one with a variant.
TINY_CONFIGS = {
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
    config_class, extra = TINY_CONFIGS[family]
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




def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, n) random ids of the tiny models' vocabulary, past the special ones (0-2)."""
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def decoded(model, ids: torch.Tensor, prompt: int, cache=None, n_global=None) -> torch.Tensor:
    """Logits (1, n - prompt + 1, vocab) of a prompt's last token (through the forward), then of
    each later token fed one at a time; prompt 0: every token one at a time from an empty cache."""
    cache = lminf.make_cache(model, n_global=n_global) if cache is None else cache
    extra = {} if n_global is None else {"lminf_n_global": n_global}
    first = [model(ids[:, :prompt], **cache_kwarg(model, cache), **extra).logits[:, -1]] if prompt else []
    step = decoder(model, cache, n_global)
    return torch.stack([*first, *(step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1]))], dim=1)


def lminf_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`lminf ARGS` in a subprocess (this tree's lminf), its output captured."""
    return subprocess.run([sys.executable, "-m", "lminf.cli", *args], input=stdin, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(args: list[str], headers: dict | None = None, seconds: float = 120) -> tuple[subprocess.Popen, str]:
    """`lminf serve` with `args` (no --port: a free one) in its own process, once /health answers -> (process, base URL)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "lminf.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    base, end = f"http://127.0.0.1:{port}", time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", headers=headers).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read()}")
