"""`lminf bench`: prefill time, decode latency and peak memory against context length,
vanilla and lminf side by side in one run.

Each (method, length) cell runs in a fresh child process, so its peak memory is its own
(peak RSS on CPU, the allocator's peak on GPU): the child loads the model, feeds a random
prompt of `length` tokens through the cache in chunks (prefill), then decodes
`decode_tokens` tokens one at a time and reports the median step. Token values do not
change the speed, so the prompt is random. Vanilla cells above `vanilla_up_to` are
recorded as not run, with the reason, never silently dropped.

Floors: each cell also records the least work it needs (the bytes one decoding step must
read, the FLOPs of the prefill counting only the query-key pairs the mask keeps), and the
run measures the machine's read bandwidth and dense matmul rate first, in a child under
the same settings; work over rate is the floor shown beside each time.
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
    lambda_settings = None if method == "vanilla" else lminf.settings_of(model)
    n_kept = length + 1 if lambda_settings is None else min(length + 1, cache.layers[0].n_sink + lambda_settings.n_local)
    return {
        "prefill_s": prefill_s,
        "decode_ms": 1000 * statistics.median(steps[1:] or steps),  # the first step warms up
        "peak_mib": peak,
        "cache_mib": cache_bytes / 2**20,
        # What the work needs at the least (see floors): bytes one decoding step reads, prefill FLOPs.
        "decode_bytes": weight_bytes(model) + n_kept * kv_bytes_per_token(model),
        "prefill_flops": prefill_flops(model, length, lambda_settings),
    }


def weight_bytes(model) -> int:
    """Every distinct weight is read once per decoding step (tied embeddings: the output layer)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * model.dtype.itemsize


def keys_per_prompt(length: int, settings=None) -> int:
    """Query-key pairs that causal attention computes over a prompt: all earlier keys
    (vanilla), or the last n_local plus, past the window, n_global (Lambda, no top-k)."""
    if settings is None:
        return length * (length + 1) // 2
    n_local, n_global = settings.n_local, settings.n_global
    inside = min(length, n_local)
    beyond = length - inside  # the t-th query past the window sees min(t, n_global) global keys
    ramp = min(beyond, n_global)
    return inside * (inside + 1) // 2 + beyond * n_local + ramp * (ramp + 1) // 2 + (beyond - ramp) * n_global


def prefill_flops(model, length: int, settings=None) -> int:
    """2 FLOPs per weight per token in the decoder layers (the output layer runs on one
    token per chunk: left out), plus 4 * heads * head_dim per query-key pair per layer."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    attention = 4 * c.num_attention_heads * head_dim * c.num_hidden_layers * keys_per_prompt(length, settings)
    return 2 * layer_params * length + attention


def measure_rates(device: str, dtype: str, threads: int | None) -> dict:
    """The machine's ceilings, measured the way the cells run: read bandwidth (summing a
    large tensor) and the dense matmul rate, each the best of several tries."""
    if threads:
        torch.set_num_threads(threads)
    dtype_ = getattr(torch, dtype)
    x = torch.ones(2**28 // dtype_.itemsize, dtype=dtype_, device=device)  # 256 MiB
    n = 4096 if str(device).startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device).to(dtype_), torch.randn(n, n, device=device).to(dtype_)
    read_s, matmul_s = _best(lambda: x.sum(), device), _best(lambda: a @ b, device)
    return {"bandwidth_gb_s": x.numel() * x.element_size() / read_s / 1e9, "matmul_tflop_s": 2 * n**3 / matmul_s / 1e12}


def _best(fn, device, tries: int = 5) -> float:
    fn()
    times = []
    for _ in range(tries):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _child(queue, fn, *args) -> None:
    try:
        queue.put(fn(*args))
    except Exception as error:  # reported in the table, e.g. out of memory
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _in_child(context, fn, *args) -> dict:
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, fn, *args))
    child.start()
    result = queue.get()
    child.join()
    return result


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
    if "rates" not in report:
        report["rates"] = _in_child(context, measure_rates, settings["device"], settings["dtype"], settings["threads"])
    for length in lengths:
        for method in ("vanilla", "lminf"):
            key = f"{method}/{length}"
            if key in cells:
                continue
            if method == "vanilla" and length > vanilla_up_to:
                cells[key] = {"method": method, "tokens": length, "skipped": f"above --vanilla-up-to {vanilla_up_to}"}
            else:
                result = _in_child(context, measure_cell, model_path, method, length, settings)
                cells[key] = {"method": method, "tokens": length, **result}
            if progress:
                print(f"{key}: {cells[key]}", flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(report, indent=2))
    return report


def floors(report: dict, cell: dict) -> dict:
    """The least time a cell's work can take on this machine: prefill FLOPs at the dense
    matmul rate, a decoding step's bytes at the read bandwidth. {} when not measured."""
    rates = report.get("rates") or {}
    if "prefill_flops" not in cell or "matmul_tflop_s" not in rates:
        return {}
    return {
        "prefill_s": cell["prefill_flops"] / (rates["matmul_tflop_s"] * 1e12),
        "decode_ms": 1000 * cell["decode_bytes"] / (rates["bandwidth_gb_s"] * 1e9),
    }


def bench_table(report: dict) -> str:
    lines = [
        "| tokens | prefill s vanilla | prefill s lminf | decode ms/token vanilla | decode ms/token lminf "
        "| peak MiB vanilla | peak MiB lminf | KV cache MiB vanilla | KV cache MiB lminf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fields = (("prefill_s", "{:.1f}"), ("decode_ms", "{:.0f}"), ("peak_mib", "{:.0f}"), ("cache_mib", "{:.0f}"))
    for length in sorted({c["tokens"] for c in report["results"].values()}):
        pair = [report["results"].get(f"{m}/{length}", {}) for m in ("vanilla", "lminf")]
        row = [str(length)]
        for field, fmt in fields:
            for c in pair:
                if field not in c:
                    row.append("not run" if "skipped" in c else "failed" if "error" in c else "-")
                    continue
                floor = floors(report, c).get(field)
                row.append(fmt.format(c[field]) + ("" if floor is None else f" ({fmt.format(floor)})"))
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        f"- {c['method']} at {c['tokens']}: {c.get('skipped') or c['error']}"
        for c in report["results"].values()
        if "prefill_s" not in c
    ]
    rates = report.get("rates") or {}
    if "matmul_tflop_s" in rates:
        notes.append(
            f"- In parentheses, the floor: prefill FLOPs at the measured dense matmul rate "
            f"({1000 * rates['matmul_tflop_s']:.0f} GFLOP/s), a decoding step's bytes (every weight, plus the keys and "
            f"values it attends to) at the measured read bandwidth ({rates['bandwidth_gb_s']:.1f} GB/s)."
        )
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
        for method, color in (("vanilla", "C0"), ("lminf", "C1")):
            cells = [c for c in report["results"].values() if c["method"] == method and field in c]
            cells.sort(key=lambda c: c["tokens"])
            ax.plot([c["tokens"] for c in cells], [c[field] for c in cells], marker="o", color=color, label=method)
            floor = [(c["tokens"], floors(report, c)[field]) for c in cells if field in floors(report, c)]
            if floor:
                ax.plot(*zip(*floor, strict=True), linestyle="--", color=color, alpha=0.6, label=f"{method} floor")
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
