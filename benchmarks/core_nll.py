"""Vanilla vs lminf NLL per position bucket on one long text, with the default model.

    python benchmarks/core_nll.py TEXT_FILE [--tokens 32768] [--bucket 2048] [--out runs/core_nll.json]

Prints a table and writes JSON (settings, machine, versions, per-bucket means, wall times).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import lminf
from lminf.evaluate import bucket_means, token_nll


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("text", type=Path)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--bucket", type=int, default=2048)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--n-local", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/core_nll.json"))
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = lminf.load_default(torch.float32)
    ids = tokenizer(args.text.read_text(encoding="utf-8", errors="replace"), return_tensors="pt")["input_ids"]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"{args.text} has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    ids = ids[:, : args.tokens]

    results = {}
    for method in ("vanilla", "lminf"):
        if method == "lminf":
            lminf.patch(model, n_global=args.n_global, n_local=args.n_local)
        cache = lminf.make_cache(model) if method == "lminf" else DynamicCache()
        start = time.perf_counter()
        nll = token_nll(model, ids, cache)
        results[method] = {"bucket_nll": bucket_means(nll, args.bucket), "seconds": time.perf_counter() - start}

    settings = lminf.settings_of(model)
    report = {
        "text": args.text.name,
        "tokens": args.tokens,
        "bucket": args.bucket,
        "settings": dataclasses.asdict(settings),
        "model": "SmolLM2-135M-Instruct (float32)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"| tokens | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for k in range(len(results["vanilla"]["bucket_nll"])):
        row = " | ".join(f"{results[m]['bucket_nll'][k]:.2f}" for m in results)
        print(f"| {k * args.bucket // 1024}-{(k + 1) * args.bucket // 1024}k | {row} |")
    print(" | ".join(f"{m}: {r['seconds']:.0f} s" for m, r in results.items()))


if __name__ == "__main__":
    main()
