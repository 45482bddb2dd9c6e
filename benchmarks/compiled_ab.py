"""Decoding with kernel "compiled" against the default kernel, side by side in one process.

    python benchmarks/compiled_ab.py [--weights dense] [--kv-dtype bfloat16] [--contexts 1024,8192]
                                     [--tokens 64] [--rounds 3] [--threads 2] [--out runs/compiled-ab.json]

Two copies of the default model, one patched with LM-Infinite on kernel "auto" (as loaded:
wide float32 weights input-major) and one on kernel "compiled" (its layers and attention
compiled: lminf.kernels.decode_layers, lminf.kernels.one_query). Per context, each fills its
cache with the start of Python's `_pydecimal.py` (repeated to length), decodes a few tokens to
compile, then both run `--tokens` greedy fast steps from a copy of their cache, alternating
for `--rounds` rounds, so both see the same machine. It checks they wrote the same tokens,
prints a table (ms per token: min and median over rounds, each round's median step) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import lminf
from lminf.eval.runs import machine
from lminf.generation import decoder

KERNELS = ("auto", "compiled")


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = open(__import__("_pydecimal").__file__).read()
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.repeat(1, -(-n // ids.shape[1]))[:, :n]


@torch.inference_mode()
def greedy(model, cache, token: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """Seconds of each of n greedy fast steps from `token` (1, 1), and the tokens written."""
    step, times, written = decoder(model, cache), [], []
    for _ in range(n):
        start = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
        written.append(int(token))
    return times, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="dense", choices=("dense", "gguf"))
    parser.add_argument("--kv-dtype", default=None, choices=("bfloat16",))
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/compiled-ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kv_dtype = getattr(torch, args.kv_dtype) if args.kv_dtype else None
    models = {}
    for kernel in KERNELS:
        model, tokenizer = lminf.load_default(weights=args.weights)
        models[kernel] = lminf.patch(model, "lminf", backend=kernel, kv_dtype=kv_dtype)
    cells = []
    for n in (int(c) for c in args.contexts.split(",")):
        ids = prompt_ids(tokenizer, n)
        filled = {}
        for kernel, model in models.items():
            filled[kernel] = lminf.make_cache(model)
            lminf.prefill(model, ids[:, :-1], filled[kernel])
            greedy(model, copy.deepcopy(filled[kernel]), ids[:, -1:], 4)  # compiles (kernel "compiled")
        times, written = {k: [] for k in KERNELS}, {}
        for _ in range(args.rounds):
            for kernel, model in models.items():
                steps, written[kernel] = greedy(model, copy.deepcopy(filled[kernel]), ids[:, -1:], args.tokens)
                times[kernel].append(1000 * statistics.median(steps))
        step = decoder(models["compiled"], filled["compiled"])
        cell = {
            "context": n,
            "tokens": args.tokens,
            "same_tokens": written["auto"] == written["compiled"],
            "compiled_runs": {"attention": step.attention_kernel, "layers": step.layers_kernel},
        }
        for kernel in KERNELS:
            cell[kernel] = {"min_ms": round(min(times[kernel]), 2), "median_ms": round(statistics.median(times[kernel]), 2)}
        cell["speedup_median"] = round(cell["auto"]["median_ms"] / cell["compiled"]["median_ms"], 3)
        cells.append(cell)
    report = {"machine": machine(), "weights": args.weights, "kv_dtype": args.kv_dtype, "rounds": args.rounds, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['machine']}, weights {args.weights}, kv {args.kv_dtype or 'float32'}, {args.rounds} rounds alternating")
    print("| context | auto ms/token (min / median) | compiled ms/token (min / median) | speedup | same tokens | compiled ran |")
    print("|---:|---:|---:|---:|---|---|")
    for c in cells:
        a, k = c["auto"], c["compiled"]
        ran = "attention {attention}, layers {layers}".format(**c["compiled_runs"])
        row = f"| {c['context']} | {a['min_ms']} / {a['median_ms']} | {k['min_ms']} / {k['median_ms']} | "
        print(row + f"{c['speedup_median']}x | {c['same_tokens']} | {ran} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
