#!/usr/bin/env bash
# The RULER methods grid on the default model: 11 tasks x 4 prompts per (method, length).
# Inside the 8,192-token window every LM-Infinite-style method computes vanilla's attention, so
# 4k runs vanilla and lminf (the check), 8k adds infllm (128 + 4,096 tokens: not vanilla's
# computation there), 16k all five methods.
#
# Two workers of 1 thread each (both cores of a 2-core machine busy); each writes its
# own resumable JSON into the tracked folder below, so a fresh checkout resumes where the last
# session's commit left it. Rerun this script to continue; `lminf eval merge` joins the two
# files when the grid is done. Set CODE to a pinned worktree (`git worktree add /work/grid HEAD`)
# so commits made while it runs do not change the code under it.
set -u
cd "$(dirname "$0")/.."
OUT="$PWD/docs/measurements/ruler-grid"
CODE="${CODE:-$PWD}"
mkdir -p "$OUT" runs
# infllm at 16k is split by task between the workers, so both finish near the same time
INFLLM_A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3
INFLLM_B=niah_multivalue,niah_multiquery,vt,cwe,fwe
ruler() {  # ruler WORKER lminf-eval-ruler-flags...
    (cd "$CODE" && PYTHONPATH="$CODE" lminf eval ruler --samples 4 --threads 1 --out "$OUT/$1.json" "${@:2}")
}
{
    ruler a --methods vanilla --lengths 4096,8192,16384 &&
        ruler a --methods sinks --lengths 16384 &&
        ruler a --methods infllm --lengths 16384 --tasks "$INFLLM_A"
} >> runs/ruler-grid-a.log 2>&1 &
sleep 60  # the first worker converts and caches the model; the second then only reads it
{
    ruler b --methods lminf --lengths 4096,8192 &&
        ruler b --methods infllm --lengths 8192 &&
        ruler b --methods lminf,lminf-topk --lengths 16384 &&
        ruler b --methods infllm --lengths 16384 --tasks "$INFLLM_B"
} >> runs/ruler-grid-b.log 2>&1 &
wait
