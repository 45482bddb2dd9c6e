"""`lminf bench`: prefill time, decode latency and peak memory against context length,
the methods asked for (lminf.eval.methods: vanilla and any strategy's) side by side in one run.

Each (method, length) cell runs in a fresh child process, so its peak memory is its own
(peak RSS on CPU, the allocator's peak on GPU): the child loads the model, feeds a random
prompt of `length` tokens through the cache in chunks (prefill), then decodes
`decode_tokens` tokens one at a time and reports the median step. Token values do not
change the speed, so the prompt is random. Vanilla cells above `vanilla_up_to` are
recorded as not run, with the reason, never silently dropped. Tables and plots:
lminf.eval.tables.bench_table, lminf.eval.plots.plot_bench.

Floors: each cell also records the least work it needs (the bytes one decoding step must
read, the FLOPs of the prefill counting only the query-key pairs the method keeps, from
`kept_pairs`: every causal pair for vanilla, the strategy's count, layer by layer, otherwise), and the
run measures the machine's dense matmul rate first, in a child under the same settings; work
over rate is the floor shown beside each time. The read bandwidth is measured by each cell,
after its decoding steps, in its own process: summing as many bytes as its step reads. A step
that fits the last-level cache (300 MiB on one host here) is read from the cache; one larger
is read from memory; so one fixed-size probe gives one cell's floor and not another's. Cells
of older runs, without their own reading, use the run's 256 MiB probe.
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import signal
import statistics
import time
from pathlib import Path

import torch

from lminf.decoding import FastStep
from lminf.default_model import load_model
from lminf.eval.methods import Method, check_distinct
from lminf.eval.runs import RunStore
from lminf.generation import decoder, forward_step, prefill
from lminf.memory import cache_mib, cache_tiers, peak_mib
from lminf.weights.int4 import Int4Linear
from lminf.weights.linear_layout import arrange_linear_weights, input_major_count


def measure_cell(model_path: str | None, method: Method, length: int, settings: dict, prompt: torch.Tensor | None = None) -> dict:
    """One cell, in the current process: times, memory, the work's least needs, the method's resolved settings.
    prompt: (1, length + 1) token ids (default random: token values do not change the speed)."""
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    model, _ = load_model(model_path, dtype, settings.get("weights", "dense"))
    model.to(device)
    # Row-major again off the CPU; settings "linear_layout": "row-major" measures the layout as loaded.
    arrange_linear_weights(model, settings.get("linear_layout", "input-major") == "input-major")
    method = method.resolved(model)
    ids = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(0))
    ids = (ids if prompt is None else prompt).to(device)
    with method.patched(model), torch.inference_mode():
        cache = method.new_cache(model)
        _sync(device)
        start = time.perf_counter()
        prefill(model, ids[:, :length], cache, chunk_size=settings["chunk"])
        _sync(device)
        prefill_s = time.perf_counter() - start
        # settings "decode_step": "forward" times the model's forward even where the fast step applies.
        step = decoder(model, cache) if settings.get("decode_step", "fast") == "fast" else forward_step(model, cache)
        steps = _decode_steps(step, ids[:, length:], settings["decode_tokens"], device)
    layers = model.config.num_hidden_layers
    # Keys and values one decoding step reads: those the next query (position `length`) attends to, per layer.
    decode_keys = sum(method.kept_pairs(length + 1, layer) - method.kept_pairs(length, layer) for layer in range(layers))
    cell = {
        "prefill_s": prefill_s,
        "decode_ms": 1000 * statistics.median(steps[1:] or steps),  # the first step warms up
        "peak_mib": peak_mib(device),
        "cache_mib": cache_mib(cache),
        "host_kv_mib": cache_tiers(cache)["host_kv_mib"],  # a block memory's blocks (InfLLM); 0 otherwise
        # What the work needs at the least (see floors): bytes one decoding step reads, prefill FLOPs.
        "decode_bytes": weight_bytes(model) + decode_keys * kv_bytes_per_token(model, cache_itemsize(cache)) // layers,
        "prefill_flops": prefill_flops(model, length, method),
        "settings": method.settings(),
        # Linear weights stored input-major (lminf.weights.linear_layout), as decoding read them.
        "input_major_weights": input_major_count(model),
        "decode_step": "fast" if isinstance(step, FastStep) else "forward",  # which step ran (lminf.decoding)
        # What the step's attention and its layers ran on.
        **({"decode_kernel": step.attention_kernel, "decode_layers": step.layers_kernel} if isinstance(step, FastStep) else {}),
    }
    del model, cache, step  # the probe's buffer in their place: the peak above stays the cell's own
    cell["read_gb_s"] = read_rate(cell["decode_bytes"], device)
    return cell


def _decode_steps(step, token: torch.Tensor, n: int, device) -> list[float]:
    """Seconds of each of `n` greedy decoding steps (lminf.generation.decoder) after `token` (1, 1)."""
    steps = []
    for _ in range(n):
        start = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - start)
    return steps


def weight_bytes(model) -> int:
    """Every distinct weight is read once per decoding step (tied embeddings: the output layer),
    4-bit blocks as stored (Int4Linear's buffers); an input embedding table not used as the
    output layer gives one row."""
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(b): b for m in model.modules() if isinstance(m, Int4Linear) for b in m.buffers()})
    table = model.get_input_embeddings().weight
    if table is not getattr(model.get_output_embeddings(), "weight", None):
        tensors[id(table)] = table[0]
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(model, itemsize: int | None = None) -> int:
    """Bytes of one token's keys and values over all layers; `itemsize` per number (default the model's)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * (itemsize or model.dtype.itemsize)


def cache_itemsize(cache) -> int | None:
    """Bytes per number the cache stores keys in (a 16-bit cache: 2); None when it holds none."""
    keys = next((layer.keys for layer in getattr(cache, "layers", []) if getattr(layer, "keys", None) is not None), None)
    return None if keys is None else keys.element_size()


def prefill_pairs(method: Method, length: int, layers: int) -> int:
    """Query-key pairs the method's attention keeps over a causal prompt, summed over layers."""
    return sum(method.kept_pairs(length, layer) for layer in range(layers))


def prefill_flops(model, length: int, method: Method) -> int:
    """2 FLOPs per weight per token in the decoder layers (the output layer runs on one
    token per chunk: left out), plus 4 * heads * head_dim per query-key pair kept."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers = next(m for m in model.get_decoder().children() if isinstance(m, torch.nn.ModuleList))  # the decoder layers
    low_bit = sum(m.in_features * m.out_features for m in layers.modules() if isinstance(m, Int4Linear))  # buffers
    layer_params = sum(p.numel() for p in layers.parameters()) + low_bit
    attention = 4 * c.num_attention_heads * head_dim * prefill_pairs(method, length, c.num_hidden_layers)
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


def read_rate(nbytes: int, device, tries: int = 5) -> float:
    """GB/s reading `nbytes` (summing float32 ones, the best of `tries` after one warm-up): the
    bandwidth a decoding step that reads that many bytes, again and again, can have at best."""
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    return x.numel() * 4 / _best(lambda: x.sum(), device, tries) / 1e9


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
    """fn(*args) in a fresh process: its result, or {"error": ...} where it raised or died. A crash
    in native code (llama.cpp built for instructions this CPU refuses to run) ends the process
    without a word; the cell then says so instead of waiting for it forever."""
    results = context.Queue()
    child = context.Process(target=_child, args=(results, fn, *args))
    child.start()
    while True:
        alive = child.is_alive()  # before the look: a result put just before it exited is still found
        try:
            result = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not alive:
                child.join()
                code = child.exitcode
                how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                return {"error": f"the cell's process died ({how}) without a result"}
    child.join()
    return result


def run_bench(
    model_path: str | None,
    methods: list[Method],
    lengths: list[int],
    settings: dict,
    vanilla_up_to: int,
    out_json: Path,
    meta: dict,
    progress: bool = True,
) -> dict:
    """Every (method, length) cell not already in `out_json`; the JSON is rewritten after each.
    Methods without a strategy (the vanilla model) are skipped above `vanilla_up_to` tokens."""
    check_distinct(methods)
    store = RunStore(out_json, {"settings": settings}, "holds a run with other settings ({settings}); use another --out.")
    store.report.update(meta)
    store.record_methods(methods)  # as asked; each cell records them resolved for the model
    context = multiprocessing.get_context("spawn")  # a clean process: its own peak memory
    if "rates" not in store.report:
        store.report["rates"] = _in_child(context, measure_rates, settings["device"], settings["dtype"], settings["threads"])
    for length in lengths:
        for method in methods:
            compute = functools.partial(_bench_cell, context, model_path, method, length, settings, vanilla_up_to, progress)
            store.cell(f"{method.name}/{length}", compute)
    return store.report


def _bench_cell(context, model_path, method: Method, length: int, settings: dict, vanilla_up_to: int, progress: bool) -> dict:
    if getattr(method, "strategy", None) is None and length > vanilla_up_to:
        cell = {"method": method.name, "tokens": length, "skipped": f"above --vanilla-up-to {vanilla_up_to}"}
    else:
        cell = {"method": method.name, "tokens": length, **_in_child(context, measure_cell, model_path, method, length, settings)}
    if progress:
        print(f"{method.name}/{length}: {cell}", flush=True)
    return cell


def floors(report: dict, cell: dict) -> dict:
    """The least time a cell's work can take on this machine: prefill FLOPs at the dense
    matmul rate, a decoding step's bytes at the read bandwidth the cell measured reading as
    many bytes (older cells: the run's probe). {} when not measured."""
    rates = report.get("rates") or {}
    if "prefill_flops" not in cell or "matmul_tflop_s" not in rates:
        return {}
    return {
        "prefill_s": cell["prefill_flops"] / (rates["matmul_tflop_s"] * 1e12),
        "decode_ms": 1000 * cell["decode_bytes"] / (read_gb_s(report, cell) * 1e9),
    }


def bandwidth_said(report: dict) -> str:
    """The read bandwidth behind a run's floors, in words (its range where cells measured their own)."""
    own = [c["read_gb_s"] for c in report["results"].values() if "read_gb_s" in c]
    if own:
        return f"the read bandwidth each cell measured reading as many bytes ({min(own):.1f}-{max(own):.1f} GB/s)"
    return f"the measured read bandwidth ({report['rates']['bandwidth_gb_s']:.1f} GB/s, a 256 MiB probe)"


def read_gb_s(report: dict, cell: dict) -> float:
    """The read bandwidth a cell's floor uses: its own reading, else the run's probe."""
    return cell.get("read_gb_s") or report["rates"]["bandwidth_gb_s"]


def bench_methods(report: dict) -> list[str]:
    """The methods of a bench run, in the order asked (older runs: the order of their cells)."""
    return list(report.get("methods") or dict.fromkeys(c["method"] for c in report["results"].values()))


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
