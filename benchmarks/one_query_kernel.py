"""A decoding step's attention: torch's fused CPU kernel against the compiled one (lminf.kernels.one_query),
as it runs (in parts past `PARTS_ABOVE` keys) and in one part.

    python benchmarks/one_query_kernel.py [--keys 8196] [--layers 30] [--rounds 8] [--threads 2]
                                          [--out runs/one-query-kernel.json]

The default model's shapes: 3 key heads of 3 query rows, head size 64, `--keys` stored keys per
layer (8,196: its window and first tokens) in `--layers` separate caches, so that they are read
from memory as in a step, not from the processor's cache. Per stored dtype (float32, bfloat16)
the kernels run in turns for `--rounds` rounds in this one process; it prints ms per layer
(median and min over rounds) and the read rate, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lminf.eval.runs import machine
from lminf.kernels.compiling import compiled
from lminf.kernels.one_query import compiled_pass, one_query
from lminf.kernels.sdpa import attend

HEADS, ROWS, HEAD_DIM = 3, 3, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=8196)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/one-query-kernel.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scaling, rows = HEAD_DIM**-0.5, torch.randn(1, HEADS, ROWS, HEAD_DIM)
    kernels = {
        "flash_cpu": lambda k, v: attend(rows, k, v, None, scaling, True)[0],
        "compiled": lambda k, v: compiled_pass(rows, k, v, scaling),
        "compiled_one_part": lambda k, v: whole(rows, k, v, scaling),
    }
    whole = compiled(one_query, dynamic=True)
    cells = []
    for stored in (torch.float32, torch.bfloat16):
        # Views of larger storage, as the cache's keys are.
        caches = [
            [torch.randn(1, HEADS, args.keys + 1024, HEAD_DIM).to(stored)[:, :, : args.keys] for _ in range(2)]
            for _ in range(args.layers)
        ]
        for run in kernels.values():  # compiles, warms up
            run(*caches[0])
        times = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, run in kernels.items():
                start = time.perf_counter()
                for keys, values in caches:
                    run(keys, values)
                times[name].append(1000 * (time.perf_counter() - start) / args.layers)
        read_mb = 2 * args.keys * HEADS * HEAD_DIM * stored.itemsize / 1e6
        for name, ms in times.items():
            median = statistics.median(ms)
            cells.append(
                {"kernel": name, "stored": str(stored).removeprefix("torch."), "median_ms": median, "min_ms": min(ms)}
                | {"gb_s": read_mb / median}
            )
    report = {"machine": machine(), "keys": args.keys, "layers": args.layers, "rounds": args.rounds, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"Machine: {report['machine']}; {args.keys:,} keys a layer, {HEADS} key heads x {ROWS} rows, {args.layers} layers")
    print("| stored | kernel | ms per layer (median) | min | GB/s read |\n|---|---|---:|---:|---:|")
    for c in cells:
        print(f"| {c['stored']} | {c['kernel']} | {c['median_ms']:.3f} | {c['min_ms']:.3f} | {c['gb_s']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
