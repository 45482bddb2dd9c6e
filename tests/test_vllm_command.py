"""`lminf serve --engine vllm` builds vLLM's server command without importing vLLM (runs everywhere)."""

from __future__ import annotations

import json
import sys

import pytest

import lminf
from lminf.cli import main
from lminf.vllm.server import server_command, small_cpu_env, vllm_installed
from tests.helpers import tiny_model


def test_settings_resolved_against_the_models_own_length(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)  # max_position_embeddings 64
    argv, env = server_command(
        str(tmp_path), lminf.LMInfinite(n_global=4), host="0.0.0.0", port=9000, max_model_len=100_000, name="tiny", api_key="k1"
    )
    assert env["VLLM_API_KEY"] == "k1" and "k1" not in argv  # not visible in `ps`
    flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1, 2)}
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    # n_local is the training length (64), not the raised rotary table (100,000)
    assert json.loads(flag["--additional-config"]) == {
        "lminf": {"strategy": "lminf", "n_global": 4, "n_local": 64, "top_k": 0, "top_k_from_layer": 4}
    }
    assert json.loads(flag["--hf-overrides"]) == {"max_position_embeddings": 100_000}
    assert flag["--max-model-len"] == "100000" and flag["--port"] == "9000" and flag["--dtype"] == "float32"
    assert env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1"
    with pytest.raises(ValueError, match="max-model-len"):
        server_command(str(tmp_path), lminf.LMInfinite(), host="h", port=1, max_model_len=0, name="tiny")


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_a_clear_error(capsys):
    assert main(["serve", "--engine", "vllm"]) != 0
    assert "--engine vllm needs vLLM" in capsys.readouterr().err


def test_small_cpu_machines_compute_on_every_core(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert small_cpu_env({})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert small_cpu_env({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"  # the user's stays
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in small_cpu_env({})  # vLLM's default on big machines


def test_engine_vllm_takes_the_default_weights_and_refuses_gguf(tmp_path, monkeypatch, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    monkeypatch.setattr("lminf.vllm.server.vllm_installed", lambda: True)
    started = []
    monkeypatch.setattr("os.execve", lambda path, argv, env: started.append(argv))
    assert main(["serve", "--engine", "vllm", "--model", str(tmp_path), "--device", "cpu"]) == 0  # --weights auto: dense
    assert started and started[0][:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert main(["serve", "--engine", "vllm", "--model", str(tmp_path), "--weights", "gguf"]) == 2
    assert "--weights gguf, --kv-dtype and --kernel run on lminf's own engine" in capsys.readouterr().err
