"""`lminf bench`: prefill time, decode latency and peak memory against context length,
vanilla and lminf side by side in one run.

Each (method, length) cell runs in a fresh child process, so its peak memory is its own
(peak RSS on CPU, the allocator's peak on GPU): the child loads the model, feeds a random
prompt of `length` tokens through the cache in chunks (prefill), then decodes
`decode_tokens` tokens one at a time and reports the median step. Token values do not
change the speed, so the prompt is random. Vanilla cells above `vanilla_up_to` are
recorded as not run, with the reason, never silently dropped.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch


def measure_cell(model_path: str | None, method: str, length: int, settings: dict) -> dict:
    """One cell, in the current process: {"prefill_s", "decode_ms", "peak_mib", "cache_mib"}."""
    from transformers import DynamicCache

    import lminf

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    model, _ = lminf.load_model(model_path, dtype)
    model.to(device)
    if method == "lminf":
        lminf.patch(model, settings["n_global"], settings["n_local"])
    cache = lminf.make_cache(model) if method == "lminf" else DynamicCache()
    ids = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        lminf.prefill(model, ids[:, :length], cache, chunk_size=settings["chunk"])
        _sync(device)
        prefill_s = time.perf_counter() - start
        token, steps = ids[:, length:], []
        for _ in range(settings["decode_tokens"]):
            start = time.perf_counter()
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(time.perf_counter() - start)
    if hasattr(cache, "memory_bytes"):  # LambdaCache: its spare room counts too
        cache_bytes = cache.memory_bytes()
    else:
        cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    if str(device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB
    return {
        "prefill_s": prefill_s,
        "decode_ms": 1000 * statistics.median(steps[1:] or steps),  # the first step warms up
        "peak_mib": peak,
        "cache_mib": cache_bytes / 2**20,
    }


def _child(queue, *args) -> None:
    try:
        queue.put(measure_cell(*args))
    except Exception as error:  # reported in the table, e.g. out of memory
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_bench(
    model_path: str | None,
    lengths: list[int],
    settings: dict,
    vanilla_up_to: int,
    out_json: Path,
    meta: dict,
    progress: bool = True,
) -> dict:
    """Every (method, length) cell not already in `out_json`; the JSON is rewritten after each."""
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    if report and report.get("settings") != settings:
        raise ValueError(f"{out_json} holds a run with other settings ({report.get('settings')}); use another --out.")
    report.update({"settings": settings, **meta})
    cells = report.setdefault("results", {})
    context = multiprocessing.get_context("spawn")  # a clean process: its own peak memory
    for length in lengths:
        for method in ("vanilla", "lminf"):
            key = f"{method}/{length}"
            if key in cells:
                continue
            if method == "vanilla" and length > vanilla_up_to:
                cells[key] = {"method": method, "tokens": length, "skipped": f"above --vanilla-up-to {vanilla_up_to}"}
            else:
                queue = context.Queue()
                child = context.Process(target=_child, args=(queue, model_path, method, length, settings))
                child.start()
                result = queue.get()
                child.join()
                cells[key] = {"method": method, "tokens": length, **result}
            if progress:
                print(f"{key}: {cells[key]}", flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(report, indent=2))
    return report


def bench_table(report: dict) -> str:
    lines = [
        "| tokens | prefill s vanilla | prefill s lminf | decode ms/token vanilla | decode ms/token lminf "
        "| peak MiB vanilla | peak MiB lminf | KV cache MiB vanilla | KV cache MiB lminf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length in sorted({c["tokens"] for c in report["results"].values()}):
        pair = [report["results"].get(f"{m}/{length}", {}) for m in ("vanilla", "lminf")]
        row = [str(length)]
        for field, fmt in (("prefill_s", "{:.1f}"), ("decode_ms", "{:.0f}"), ("peak_mib", "{:.0f}"), ("cache_mib", "{:.0f}")):
            row += [
                fmt.format(c[field]) if field in c else ("not run" if "skipped" in c else "failed" if "error" in c else "-")
                for c in pair
            ]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        f"- {c['method']} at {c['tokens']}: {c.get('skipped') or c['error']}"
        for c in report["results"].values()
        if "prefill_s" not in c
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_bench(report: dict, out_png: Path) -> None:
    """Prefill time, decode latency and peak memory against context length, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (field, label) in zip(
        axes, (("prefill_s", "prefill (s)"), ("decode_ms", "decode (ms/token)"), ("peak_mib", "peak memory (MiB)")), strict=True
    ):
        for method in ("vanilla", "lminf"):
            cells = [c for c in report["results"].values() if c["method"] == method and field in c]
            cells.sort(key=lambda c: c["tokens"])
            ax.plot([c["tokens"] for c in cells], [c[field] for c in cells], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=label)
        ax.legend()
    fig.suptitle(f"{report.get('model')} on {report.get('machine')}", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
