"""lminf inside vLLM: a plugin that runs a registered strategy as vLLM's attention.

vLLM loads it in every process through the `vllm.general_plugins` entry point (declared
in pyproject.toml). It overrides vLLM's CPU attention backend with a subclass that passes
straight through to the original unless the engine was started with lminf settings, and
registers the KV-cache spec that frees the blocks the strategy no longer reads
(kv_cache.py); `lminf serve --engine vllm` (server.py) starts vLLM's server with them:

    vllm.LLM(model, additional_config={"lminf": {"strategy": "lminf", "n_global": 10, "n_local": 256}})
    python -m vllm.entrypoints.openai.api_server --model MODEL --additional-config '{"lminf": {"n_local": 256}}'

Only this subpackage imports vLLM.
"""

from __future__ import annotations

CONFIG_KEY = "lminf"  # the key of vLLM's additional_config that holds the strategy and its settings


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lminf.vllm.kv_cache import register_spec

    if not current_platform.is_cpu():
        # Other platforms pick other attention backends, which lminf does not override yet.
        init_logger("vllm.lminf").warning("lminf: the vLLM plugin runs on the CPU backend only; lminf settings do nothing here.")
        return

    register_backend(AttentionBackendEnum.CPU_ATTN, "lminf.vllm.backend.LminfCPUAttentionBackend")
    register_spec()  # inert unless a layer's spec is lminf's (only with lminf settings)
