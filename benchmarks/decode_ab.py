"""The decoding step of two checkouts of lminf, side by side: same tokens, alternating rounds.

    python benchmarks/decode_ab.py --base /tmp/base [--head .] [--contexts 1024,8192] [--tokens 32]
                                   [--rounds 3] [--threads 2] [--out docs/measurements/decode-ab.json]

Per weight setting (float32; the default model's own 4-bit GGUF blocks with a bfloat16 cache)
and context, one worker process per checkout (its `lminf` imported from that folder) loads the
default model patched with LM-Infinite, fills its cache with the start of Python's
`_pydecimal.py` (repeated to length) and warms up; then, round after round, each in turn decodes
`--tokens` greedy steps from a copy of its cache, so both see the same machine. It checks they
wrote the same tokens, prints a table (ms per token, each round's median step) and writes JSON
with every round's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"float32": ("dense", None), "gguf+bfloat16": ("gguf", "bfloat16")}


def worker(weights: str, kv_dtype: str | None, context: int, tokens: int, threads: int) -> None:
    """Load, fill, warm up; then per line on stdin decode `tokens` steps and print their times and tokens."""
    import copy
    import time

    import torch

    import lminf
    from lminf.generation import decoder

    torch.set_num_threads(threads)
    model, tokenizer = lminf.load_default(weights=weights)
    lminf.patch(model, "lminf", kv_dtype=getattr(torch, kv_dtype) if kv_dtype else None)
    ids = tokenizer(open(__import__("_pydecimal").__file__).read(), return_tensors="pt").input_ids
    ids = ids.repeat(1, -(-context // ids.shape[1]))[:, :context]
    filled = lminf.make_cache(model)
    lminf.prefill(model, ids[:, :-1], filled)

    @torch.inference_mode()
    def greedy(n: int) -> tuple[list[float], list[int]]:
        step, token, times, written = decoder(model, copy.deepcopy(filled)), ids[:, -1:], [], []
        for _ in range(n):
            start = time.perf_counter()
            token = step(token).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
            written.append(int(token))
        return times, written

    greedy(4)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        times, written = greedy(tokens)
        print(json.dumps({"ms": 1000 * statistics.median(times), "tokens": written}), flush=True)


def start(tree: Path, setting: str, context: int, args: argparse.Namespace) -> subprocess.Popen:
    weights, kv_dtype = SETTINGS[setting]
    command = [sys.executable, __file__, "--worker", weights, kv_dtype or "", str(context), str(args.tokens), str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)


def ask(process: subprocess.Popen) -> dict:
    process.stdin.write("go\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def cell(setting: str, context: int, trees: dict[str, Path], args: argparse.Namespace) -> dict:
    """One setting and context: every round's median ms per token for each checkout."""
    workers = {name: start(tree, setting, context, args) for name, tree in trees.items()}
    for process in workers.values():
        assert json.loads(process.stdout.readline())["ready"]
    times, written = {name: [] for name in trees}, {}
    for _ in range(args.rounds):
        for name, process in workers.items():
            answer = ask(process)
            times[name].append(round(answer["ms"], 3))
            written[name] = answer["tokens"]
    for process in workers.values():
        process.stdin.close()
        process.wait()
    ratio = statistics.median(times["head"]) / statistics.median(times["base"])
    same = written["head"] == written["base"]
    measured = {"setting": setting, "context": context, "round_median_ms": times}
    return {**measured, "head_over_base": round(ratio, 3), "same_tokens": same}


def commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=tree).stdout.strip()


def cpu() -> dict:
    """lscpu's model name and the number of CPUs."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {"model_name": fields.get("Model name", "?").strip(), "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--head", type=Path, default=Path("."))
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/decode-ab.json"))
    args = parser.parse_args()
    trees = {"base": args.base, "head": args.head}
    contexts = [int(c) for c in args.contexts.split(",")]
    cells, load_before = [], os.getloadavg()[0]
    for setting in args.settings.split(","):
        for context in contexts:
            cells.append(cell(setting, context, trees, args))
            print(json.dumps(cells[-1]), flush=True)
    report = {
        "script": "benchmarks/decode_ab.py",
        "commits": {name: commit(tree) for name, tree in trees.items()},
        "machine": cpu(),
        "load_1min": {"before": load_before, "after": os.getloadavg()[0]},  # the run's own workers count too
        "note": "the checkouts alternate every round, so both see the same machine",
        "tokens": args.tokens,
        "threads": args.threads,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['machine']['model_name']} ({report['machine']['cpus']} CPUs), {args.rounds} rounds alternating")
    print("| weights | context | base ms/token | head ms/token | head / base | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for c in cells:
        base, head = (statistics.median(c["round_median_ms"][k]) for k in ("base", "head"))
        print(f"| {c['setting']} | {c['context']} | {base:.2f} | {head:.2f} | {c['head_over_base']}x | {c['same_tokens']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        weights, kv_dtype, context, tokens, threads = sys.argv[2:]
        worker(weights, kv_dtype or None, int(context), int(tokens), int(threads))
    else:
        main()
