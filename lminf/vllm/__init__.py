"""lminf inside vLLM: a plugin that runs a registered strategy as vLLM's attention.

vLLM loads it in every process through the `vllm.general_plugins` entry point (declared
in pyproject.toml). It overrides vLLM's CPU attention backend with a subclass that passes
straight through to the original unless the engine was started with lminf settings:

    vllm.LLM(model, additional_config={"lminf": {"strategy": "lminf", "n_global": 10, "n_local": 256}})
    vllm serve MODEL --additional-config '{"lminf": {"n_local": 256}}'

Only this subpackage imports vLLM.
"""

from __future__ import annotations

CONFIG_KEY = "lminf"  # the key of vLLM's additional_config that holds the strategy and its settings


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "lminf.vllm.backend.LminfCPUAttentionBackend")
