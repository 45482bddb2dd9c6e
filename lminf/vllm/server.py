"""`lminf serve --engine vllm`: vLLM's own OpenAI-compatible server with the plugin active.

It only builds vLLM's command line (nothing here imports vLLM): the strategy's settings go
into `--additional-config`, the model's length limit and rotary table are raised to
`max_model_len` (`--hf-overrides`, `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`), and `n_local` is
resolved against the model's own config first, before the override could move its default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping

from transformers import AutoConfig

from lminf.strategies import Strategy
from lminf.vllm import CONFIG_KEY


def small_cpu_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with vLLM's CPU build told to compute on every core of a small machine.

    It keeps one core for its engine process by default (VLLM_CPU_NUM_OF_RESERVED_CPU),
    half of a 2-core machine: there 8 clients x 1k-token prompts got 37.3 generated tokens/s
    with the core kept and 58.5 without (benchmarks/serving_bench.py, plain vLLM). A value
    already set stays, and machines of more than 4 cores keep vLLM's default."""
    if (os.cpu_count() or 1) > 4 or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return dict(environ)
    return {**environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def server_command(
    model_dir: str,
    strategy: Strategy,
    *,
    host: str,
    port: int,
    max_model_len: int,
    name: str,
    api_key: str | None = None,
    dtype: str = "auto",
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start vLLM's OpenAI server on `model_dir` running `strategy`."""
    config = AutoConfig.from_pretrained(model_dir)
    if max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {max_model_len}.")
    settings = {k: v for k, v in strategy.resolve(config).settings().items() if v is not None}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", name]
    argv += ["--host", host, "--port", str(port), "--dtype", "float32" if dtype == "auto" else dtype]
    argv += ["--max-model-len", str(max_model_len), "--hf-overrides", json.dumps({"max_position_embeddings": max_model_len})]
    argv += ["--additional-config", json.dumps({CONFIG_KEY: settings})]
    env = {**os.environ, "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    if api_key:
        env["VLLM_API_KEY"] = api_key  # vLLM reads it there; on the command line it would show in `ps`
    return argv + list(extra or []), env
