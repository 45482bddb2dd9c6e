#!/usr/bin/env bash
# The authors'-code check: LongHeads' and SirLLM's own code on the default model, then lminf's side.
#   checks/authors/run.sh LONGHEADS_CHECKOUT SIRLLM_CHECKOUT
# Checkouts: git clone https://github.com/LuLuLuyi/LongHeads (commit 1c9f72e726401cbccf320d2c5c72244dd92a336f)
#            git clone https://github.com/Zoeyyao27/SirLLM (commit 4c95578ba69d0c849f02cafcb3a7a60a32218987)
# Environment: PYTHON (lminf's venv, default .venv/bin/python), OUT (default runs/authors), and for LongHeads
# TOKENS (prompt length, default 8700) and SELECT_FROM (their begin_selective_length, default 8192).
set -euo pipefail
[ $# -eq 2 ] || { sed -n 2,7p "$0"; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
longheads=$(cd "$1" && pwd)
sirllm=$(cd "$2" && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=${OUT:-$root/runs/authors}

venv() {  # venv NAME PACKAGES...: the authors' pinned transformers, torch from the same release as lminf's
  local dir="$here/.venv-$1"; shift
  [ -x "$dir/bin/python" ] || { python3 -m venv "$dir" && "$dir/bin/pip" install -q torch==2.13.0 "$@"; }
}
venv longheads transformers==4.34.1 einops
venv sirllm transformers==4.33.3 rouge

"$python" -m pytest -q -p no:cacheprovider "$here/test_flash_attn_shim.py"
"$python" "$here/inputs.py" --out "$out/inputs.json" --tokens "${TOKENS:-8700}"
# One thread: their per-query loop runs many small ops, and a second thread only waits on a shared machine.
OMP_NUM_THREADS=1 "$here/.venv-sirllm/bin/python" -W ignore "$here/sirllm_run.py" \
  --sirllm "$sirllm" --inputs "$out/inputs.json" --out "$out/sirllm.pt"
PYTHONPATH="$here/shim" OMP_NUM_THREADS=1 "$here/.venv-longheads/bin/python" -W ignore "$here/longheads_run.py" \
  --longheads "$longheads" --inputs "$out/inputs.json" --out "$out/longheads.pt" \
  --begin-selective-length "${SELECT_FROM:-8192}"
"$python" "$here/compare.py" --runs "$out"
