"""Where a decoding step's time goes: the step unprofiled, then torch.profiler's time per op.

    python benchmarks/step_profile.py [--contexts 1024,9000] [--weights gguf] [--kv-dtype bfloat16]
                                      [--threads 2] [--out docs/measurements/gguf-step-profile.json]

The default model, patched with LM-Infinite; per context, the cache is filled with the start of
Python's `_pydecimal.py` (repeated to length), 10 warm-up steps run, then the median of 40
unprofiled steps ("step ms"), then 20 steps under torch.profiler: each op's calls and
milliseconds per step. Prints the table and writes JSON (script, commit, machine, rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import lminf
from lminf.eval.runs import machine
from lminf.generation import decoder

WARM, TIMED, PROFILED, TOP = 10, 40, 20, 14


def profile(model, ids: torch.Tensor, context: int) -> dict:
    """One context's unprofiled median step and its TOP ops by total time, per step."""
    cache = lminf.make_cache(model)
    with torch.inference_mode():
        lminf.prefill(model, ids[:, :context], cache)
        step, token = decoder(model, cache), ids[:, context : context + 1]
        for _ in range(WARM):
            step(token)
        times = []
        for _ in range(TIMED):
            start = time.perf_counter()
            step(token)
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED):
                step(token)
    events = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:TOP]
    ops = [
        {
            "op": e.key,
            "calls_per_step": e.count / PROFILED,
            "ms_per_step": e.cpu_time_total / PROFILED / 1000,
            "self_ms_per_step": e.self_cpu_time_total / PROFILED / 1000,
        }
        for e in events
    ]
    kernels = {"attention": getattr(step, "attention_kernel", "forward"), "layers": getattr(step, "layers_kernel", "forward")}
    return {"context": context, "step_ms": 1000 * statistics.median(times), "kernels": kernels, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,9000")
    parser.add_argument("--weights", default="gguf", choices=["dense", "gguf"])
    parser.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float16", "none"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/gguf-step-profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = lminf.load_default(weights=args.weights)
    kv_dtype = None if args.kv_dtype == "none" else getattr(torch, args.kv_dtype)
    lminf.patch(model, "lminf", kv_dtype=kv_dtype)
    contexts = [int(c) for c in args.contexts.split(",")]
    text = Path(__import__("_pydecimal").__file__).read_text()
    base = tokenizer(text, return_tensors="pt").input_ids
    ids = base.repeat(1, -(-(max(contexts) + 1) // base.shape[1]))
    rows = [profile(model, ids, context) for context in contexts]
    for row in rows:
        print(f"{row['context']} tokens: step {row['step_ms']:.2f} ms ({row['kernels']})")
        for op in row["ops"]:
            print(f"  {op['op']:40s} calls/step {op['calls_per_step']:6.1f}  ms/step {op['ms_per_step']:7.2f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "script": "benchmarks/step_profile.py",
        "commit": commit,
        "machine": machine(),
        "settings": {"weights": args.weights, "kv_dtype": args.kv_dtype, "warm": WARM, "timed": TIMED, "profiled": PROFILED},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
