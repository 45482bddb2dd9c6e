"""Prefill wall time of the default model, vanilla vs lminf, side by side in one process.

    python benchmarks/prefill.py [--lengths 8192 16384 32768] [--vanilla-up-to 16384] [--out runs/prefill.json]

The prompt goes through the cache in chunks (as `lminf generate` does): a DynamicCache
for vanilla, a LambdaCache for lminf. Random token ids: speed does not depend on them.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import lminf


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, cache, chunk: int) -> float:
    start = time.perf_counter()
    for a in range(0, ids.shape[1], chunk):
        model(ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--vanilla-up-to", type=int, default=16384, help="skip vanilla above this length (it is slow)")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("runs/prefill.json"))
    args = parser.parse_args()

    model, _ = lminf.load_default(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, max(args.lengths)), generator=torch.Generator().manual_seed(0))
    prefill_seconds(model, ids[:, :512], DynamicCache(), args.chunk)  # warm-up
    rows = []
    for n in args.lengths:
        row = {"tokens": n, "vanilla_s": None}
        if n <= args.vanilla_up_to:
            row["vanilla_s"] = prefill_seconds(model, ids[:, :n], DynamicCache(), args.chunk)
        lminf.patch(model)
        row["lminf_s"] = prefill_seconds(model, ids[:, :n], lminf.make_cache(model), args.chunk)
        lminf.unpatch(model)
        rows.append(row)
        print(row, flush=True)

    report = {
        "model": "SmolLM2-135M-Instruct (float32), n_global 10, n_local 8192",
        "chunk": args.chunk,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("| tokens | vanilla s | lminf s | lminf tok/s |\n|---|---|---|---|")
    for r in rows:
        vanilla = f"{r['vanilla_s']:.1f}" if r["vanilla_s"] is not None else "not run"
        print(f"| {r['tokens']} | {vanilla} | {r['lminf_s']:.1f} | {r['tokens'] / r['lminf_s']:.0f} |")


if __name__ == "__main__":
    main()
