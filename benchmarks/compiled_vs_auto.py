"""Decoding with kernel "compiled" against the default kernel "auto", side by side in one process.

    python benchmarks/compiled_vs_auto.py [--contexts 1024,8192] [--tokens 32] [--rounds 3]
                                          [--threads 2] [--out docs/measurements/compiled-vs-auto.json]

For each weight setting (float32; the default model's own 4-bit GGUF blocks with a bfloat16
cache), two copies of the default model patched with LM-Infinite, one on kernel "auto" and one
on kernel "compiled". Per context, each fills its cache with the start of Python's
`_pydecimal.py` (repeated to length) and decodes a few tokens to warm up (and compile), then
both run `--tokens` greedy fast steps from a copy of their cache, alternating for `--rounds`
rounds, so both see the same machine. It checks they wrote the same tokens, prints a table
(ms per token, each round's median step) and writes JSON with every round's time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import lminf
from lminf.eval.runs import machine
from lminf.generation import decoder

KERNELS = ("auto", "compiled")
SETTINGS = {"float32": ("dense", None), "gguf+bfloat16": ("gguf", torch.bfloat16)}


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = open(__import__("_pydecimal").__file__).read()
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.repeat(1, -(-n // ids.shape[1]))[:, :n]


@torch.inference_mode()
def greedy(model, cache, token: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """Seconds of each of n greedy steps from `token` (1, 1), and the tokens written."""
    step, times, written = decoder(model, cache), [], []
    for _ in range(n):
        start = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
        written.append(int(token))
    return times, written


def cpu() -> dict:
    """lscpu's model name and the number of CPUs."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {"model_name": fields.get("Model name", "?").strip(), "cpus": os.cpu_count()}


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip()


def measure(setting: str, contexts: list[int], tokens: int, rounds: int) -> list[dict]:
    """One weight setting's cells: per context, every round's median ms per token for each kernel."""
    weights, kv_dtype = SETTINGS[setting]
    models = {}
    for kernel in KERNELS:
        model, tokenizer = lminf.load_default(weights=weights)
        models[kernel] = lminf.patch(model, "lminf", backend=kernel, kv_dtype=kv_dtype)
    cells = []
    for n in contexts:
        ids = prompt_ids(tokenizer, n)
        filled = {}
        for kernel, model in models.items():
            filled[kernel] = lminf.make_cache(model)
            lminf.prefill(model, ids[:, :-1], filled[kernel])
            greedy(model, copy.deepcopy(filled[kernel]), ids[:, -1:], 4)  # warm up; compiles (kernel "compiled")
        times, written = {k: [] for k in KERNELS}, {}
        for _ in range(rounds):
            for kernel, model in models.items():
                steps, written[kernel] = greedy(model, copy.deepcopy(filled[kernel]), ids[:, -1:], tokens)
                times[kernel].append(round(1000 * statistics.median(steps), 3))
        step = decoder(models["compiled"], filled["compiled"])
        cell = {"setting": setting, "context": n, "tokens": tokens, "same_tokens": written["auto"] == written["compiled"]}
        cell["compiled_ran"] = {"attention": step.attention_kernel, "layers": step.layers_kernel}
        cell["round_median_ms"] = times
        cell["compiled_over_auto"] = round(statistics.median(times["compiled"]) / statistics.median(times["auto"]), 3)
        cells.append(cell)
        print(json.dumps(cell), flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/compiled-vs-auto.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    cells = [cell for setting in SETTINGS for cell in measure(setting, contexts, args.tokens, args.rounds)]
    report = {
        "script": "benchmarks/compiled_vs_auto.py",
        "commit": commit(),
        "machine": {**cpu(), "detail": machine()},
        "note": "the machine was shared with other processes; kernels alternate every round, so ratios are fair",
        "rounds": args.rounds,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['machine']['model_name']} ({report['machine']['cpus']} CPUs), {args.rounds} rounds alternating")
    print("| weights | context | auto ms/token | compiled ms/token | compiled / auto | same tokens | compiled ran |")
    print("|---|---:|---:|---:|---:|---|---|")
    for c in cells:
        auto, comp = (statistics.median(c["round_median_ms"][k]) for k in KERNELS)
        ran = "attention {attention}, layers {layers}".format(**c["compiled_ran"])
        ratio = c["compiled_over_auto"]
        print(f"| {c['setting']} | {c['context']} | {auto:.2f} | {comp:.2f} | {ratio}x | {c['same_tokens']} | {ran} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
