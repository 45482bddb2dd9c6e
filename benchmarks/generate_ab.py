"""`model.generate` with the fast decoding step against the model's forward, side by side.

    python benchmarks/generate_ab.py [--contexts 1024,8192] [--tokens 64] [--rounds 3] [--weights dense]
                                     [--threads 2] [--out runs/generate-ab.json]

The default model, patched with LM-Infinite; per context, one cache is filled with the start of
Python's `_pydecimal.py` (repeated to length), then greedy `generate` runs `--tokens` tokens from
a copy of it with `decode_step="auto"` (the fast step) and `"forward"`, alternating for
`--rounds` rounds in this one process, so both see the same machine. It checks the two wrote the
same tokens, prints a table (ms per generated token, min and median over rounds) and writes JSON.
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
from lminf.generation import cache_kwarg

STEPS = ("auto", "forward")


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = open(__import__("_pydecimal").__file__).read()
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.repeat(1, -(-n // ids.shape[1]))[:, :n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="dense", choices=("dense", "gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/generate-ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = lminf.load_default(weights=args.weights)
    lminf.patch(model, "lminf")
    model.generation_config.eos_token_id = None  # every run writes --tokens tokens
    cells = []
    for n in (int(c) for c in args.contexts.split(",")):
        ids = prompt_ids(tokenizer, n)
        filled = lminf.make_cache(model)
        lminf.prefill(model, ids[:, :-1], filled)
        times, outputs = {step: [] for step in STEPS}, {}
        for _ in range(args.rounds):
            for step in STEPS:
                cache = copy.deepcopy(filled)
                start = time.perf_counter()
                kwargs = dict(max_new_tokens=args.tokens, do_sample=False, decode_step=step)
                out = model.generate(ids, **cache_kwarg(model, cache), **kwargs)
                times[step].append((time.perf_counter() - start) * 1000 / args.tokens)
                outputs[step] = out[0, n:].tolist()
        cell = {"context": n, "tokens": args.tokens, "same_tokens": outputs["auto"] == outputs["forward"]}
        for step in STEPS:
            cell[step] = {"min_ms": round(min(times[step]), 2), "median_ms": round(statistics.median(times[step]), 2)}
        cell["speedup_median"] = round(cell["forward"]["median_ms"] / cell["auto"]["median_ms"], 3)
        cells.append(cell)
    report = {"machine": machine(), "weights": args.weights, "rounds": args.rounds, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['machine']}, weights {args.weights}, {args.rounds} rounds alternating")
    print("| context | fast step ms/token (min / median) | forward ms/token (min / median) | speedup | same tokens |")
    print("|---:|---:|---:|---:|---|")
    for c in cells:
        a, f = c["auto"], c["forward"]
        row = f"| {c['context']} | {a['min_ms']} / {a['median_ms']} | {f['min_ms']} / {f['median_ms']} | "
        print(row + f"{c['speedup_median']}x | {c['same_tokens']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
