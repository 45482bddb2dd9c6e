"""`lminf bench --race`: lminf against llama.cpp on the same GGUF file and the same prompt.

The default model is a GGUF file (SmolLM2-135M-Instruct, Q4_1); what a CPU user would run it
with instead is llama.cpp. Each cell (engine, context length) runs in a fresh child process,
one after the other, so its peak memory (RSS) is its own: it feeds the first `length` tokens
of the prompt (the start of Python's `_pydecimal.py`, repeated if short; the same token ids
for every engine), then decodes `decode_tokens` greedy tokens one at a time, and reports the
prefill time and the median decoding step. Engines (ENGINES): llama.cpp through
llama-cpp-python (`pip install 'lminf[race]'`; never a test dependency) with its defaults
(16-bit cache) and the same threads and batch; lminf with float32 weights, with the file's own
blocks (`--weights gguf`), and with those and a 16-bit cache; float32 with its linear
weights row-major as loaded, beside the input-major layout lminf.load_model gives them on CPU;
and the file's blocks decoded through the model's forward, beside the fast decoding step
(lminf.decoding) every other lminf engine takes. Above the model's training length llama.cpp
is not run (see LLAMA_CPP_PAST_TRAINING); lminf runs alone there.

Rounds: this host's speed drifts 20-30% between processes minutes apart, more than the targets'
margins, so `rounds` runs every cell that many times, round after round (engines side by side
within a round). The tables show medians over the rounds, and each ratio is taken within a
round (an engine against llama.cpp in the same round) before its median; the range of each is
shown beside it.
"""

from __future__ import annotations

import functools
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from lminf.default_model import BUILT_IN, DEFAULT_MODEL, model_source
from lminf.eval.bench import _in_child, bandwidth_said, floors, measure_cell, measure_rates
from lminf.eval.methods import Patched
from lminf.eval.runs import RunStore
from lminf.eval.tables import shown
from lminf.families import training_length
from lminf.memory import peak_mib
from lminf.strategies import LMInfinite

LLAMA_CPP = "llama.cpp"
# engine -> lminf's options (None: llama.cpp)
ENGINES: dict[str, dict | None] = {
    LLAMA_CPP: None,
    "lminf": {"weights": "dense"},
    "lminf-row-major": {"weights": "dense", "linear_layout": "row-major"},  # as loaded: the layout's gain, side by side
    "lminf-gguf": {"weights": "gguf"},
    "lminf-gguf-kv16": {"weights": "gguf", "kv_dtype": "bfloat16"},
    "lminf-gguf-forward": {"weights": "gguf", "decode_step": "forward"},  # the model's forward: the fast step's gain
}
LENGTHS = (1024, 8000, 16384, 32768)
DECODE_TOKENS = 64  # greedy tokens per cell by default (the protocol of the race's first table)
LLAMA_CPP_PAST_TRAINING = (
    "past the model's training length: llama.cpp has no distance cap, and its context shift "
    "(dropping old tokens) is off by default, so it stops at the context size; not run"
)


def prompt_ids(tokenizer, length: int) -> list[int]:
    """`length` + 1 token ids from the start of Python's `_pydecimal.py`, repeated if short."""
    import _pydecimal

    ids = tokenizer(Path(_pydecimal.__file__).read_text(), add_special_tokens=False).input_ids
    return (ids * (1 + (length + 1) // len(ids)))[: length + 1]


def llama_cpp_cell(gguf: Path, ids: list[int], length: int, settings: dict) -> dict:
    """One llama.cpp cell, in the current process."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError as error:
        raise RuntimeError("llama-cpp-python is not installed: pip install 'lminf[race]'") from error
    threads = settings["threads"] or torch.get_num_threads()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=length + settings["decode_tokens"] + 8,
        n_batch=settings["chunk"],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def next_token() -> int:  # greedy, from the last position's logits
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    start = time.perf_counter()
    llm.eval(ids[:length])
    prefill_s = time.perf_counter() - start
    token, steps = next_token(), []
    for _ in range(settings["decode_tokens"]):
        start = time.perf_counter()
        llm.eval([token])
        token = next_token()
        steps.append(time.perf_counter() - start)
    return {
        "prefill_s": prefill_s,
        "decode_ms": 1000 * statistics.median(steps[1:] or steps),
        "peak_mib": peak_mib(),
        "version": f"llama-cpp-python {llama_cpp.__version__}",
    }


def lminf_cell(options: dict, ids: list[int], length: int, settings: dict) -> dict:
    """One lminf cell (lminf.eval.bench.measure_cell) with the engine's options."""
    method = Patched(LMInfinite(), "lminf", options.get("kv_dtype"))
    cell_settings = {**settings, "device": "cpu", "dtype": "float32", "weights": options["weights"]}
    cell_settings["linear_layout"] = options.get("linear_layout", "input-major")
    cell_settings["decode_step"] = options.get("decode_step", "fast")
    return measure_cell(None, method, length, cell_settings, torch.tensor([ids]))


def run_race(
    lengths: list[int],
    settings: dict,
    out_json: Path,
    meta: dict,
    engines: list[str] | None = None,
    rounds: int = 1,
    progress: bool = True,
) -> dict:
    """Every (engine, length, round) cell not already in `out_json`, one after the other, for
    `engines` (default all of ENGINES, in their order); the JSON is rewritten after each. Round 0's
    cells are keyed "engine/length" (as runs before rounds), later ones "engine/length/round",
    so more rounds extend a run. The default model only: llama.cpp reads its GGUF file."""
    if rounds < 1:
        raise ValueError("--rounds must be >= 1.")
    engines = [e for e in ENGINES if e in (engines or ENGINES)]
    store = RunStore(out_json, {"settings": settings}, "holds a race with other settings ({settings}); use another --out.")
    store.report.update({**meta, "methods": {name: ENGINES[name] or {} for name in engines}})
    context = multiprocessing.get_context("spawn")
    if "rates" not in store.report:
        store.report["rates"] = _in_child(context, measure_rates, "cpu", "float32", settings["threads"])
    model_info = BUILT_IN[DEFAULT_MODEL]
    gguf = model_info.gguf(model_info)
    source = model_source(None)  # the tokenizer and config only: the cells load the model themselves
    tokenizer, trained = AutoTokenizer.from_pretrained(source), training_length(AutoConfig.from_pretrained(source))
    prompts = {length: prompt_ids(tokenizer, length) for length in lengths}
    for round_ in range(rounds):
        for length in lengths:
            for engine in engines:
                args = (context, engine, ENGINES[engine], gguf, prompts[length], length, settings, trained, progress, round_)
                store.cell(f"{engine}/{length}" + (f"/{round_}" if round_ else ""), functools.partial(_race_cell, *args))
    return store.report


def _race_cell(context, engine, options, gguf, ids, length, settings, trained, progress, round_: int = 0) -> dict:
    cell = {"method": engine, "tokens": length, "round": round_}
    if options is None and length + settings["decode_tokens"] > trained:
        cell["skipped"] = LLAMA_CPP_PAST_TRAINING
    elif options is None:
        cell.update(_in_child(context, llama_cpp_cell, gguf, ids, length, settings))
    else:
        cell.update(_in_child(context, lminf_cell, options, ids, length, settings))
    if progress:
        print(f"{engine}/{length}: {cell}", flush=True)
    return cell


def rounds_of(report: dict) -> dict[tuple[str, int], list[dict]]:
    """Each (engine, length)'s cells, one per round (a run made before rounds: one), in ENGINES' order."""
    groups: dict[tuple[str, int], list[dict]] = {}
    order = list(ENGINES)
    for c in sorted(report["results"].values(), key=lambda c: (c["tokens"], order.index(c["method"]), c.get("round", 0))):
        groups.setdefault((c["method"], c["tokens"]), []).append(c)
    return groups


def medians(report: dict) -> dict:
    """The race with one cell per (engine, length): each figure the median over the rounds that
    ran (`rounds` says how many), for the plot and the first table."""
    results = {}
    for (engine, length), cells in rounds_of(report).items():
        ran = [c for c in cells if "decode_ms" in c]
        cell = {**(ran or cells)[0], "rounds": len(ran)}
        for field in ("prefill_s", "decode_ms", "peak_mib", "cache_mib", "read_gb_s"):
            if ran and all(field in c for c in ran):
                cell[field] = statistics.median(c[field] for c in ran)
        results[f"{engine}/{length}"] = cell
    return {**report, "results": results}


def race_table(report: dict) -> str:
    """One row per (engine, length): prefill tokens/s, decoding ms/token (its floor), memory,
    medians over the rounds; then each lminf engine's decoding time over llama.cpp's in the same
    round, and over its own floor, the median over rounds, with their range where rounds > 1."""
    groups, view = rounds_of(report), medians(report)
    several = any(len(cells) > 1 for cells in groups.values())

    def spread(values: list[float], digits: int = 2) -> str:  # the range over rounds, where there are several
        return f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else ""

    lines = ["| engine | tokens | prefill tokens/s | decode ms/token (floor) | peak MiB | KV cache MiB |" + " rounds |" * several]
    lines.append("|---|---:|---:|---:|---:|---:|" + "---:|" * several)
    reasons = {}  # why a cell did not run, said once below the table
    for (engine, length), cells in groups.items():
        partly = any("decode_ms" in c for c in cells)  # then say which rounds did not run
        for c in cells:
            where = f"{engine} at {length:,}" + (f" (round {c.get('round', 0)})" if partly else "")
            if "decode_ms" not in c and where not in reasons.setdefault(c.get("skipped") or c.get("error"), []):
                reasons[c.get("skipped") or c.get("error")].append(where)
        c = view["results"][f"{engine}/{length}"]
        if "decode_ms" not in c:
            lines.append(f"| {engine} | {length:,} | {'not run' if 'skipped' in c else 'failed'} | | | |" + " |" * several)
            continue
        floor = floors(view, c).get("decode_ms")
        shown = f"{c['decode_ms']:.1f}" + spread([x["decode_ms"] for x in cells if "decode_ms" in x], 1)
        shown += "" if floor is None else f" ({floor:.1f})"
        kv = f"{c['cache_mib']:.0f}" if "cache_mib" in c else "-"
        speed = length / c["prefill_s"]
        row = f"| {engine} | {length:,} | {speed:.0f} | {shown} | {c['peak_mib']:.0f} | {kv} |"
        lines.append(row + (f" {c['rounds']} |" if several else ""))
    lines += [""] + [f"- {', '.join(where)}: {reason}." for reason, where in reasons.items()]
    lines += ["", "| engine | tokens | decode time / llama.cpp's | prefill speed / llama.cpp's | decode time / its floor |"]
    lines.append("|---|---:|---:|---:|---:|")
    for (engine, length), cells in groups.items():
        ran = [c for c in cells if "decode_ms" in c]
        if engine == LLAMA_CPP or not ran:
            continue
        rival = {c.get("round", 0): c for c in groups.get((LLAMA_CPP, length), []) if "decode_ms" in c}
        paired = [(c, rival[c.get("round", 0)]) for c in ran if c.get("round", 0) in rival]
        own = [c["decode_ms"] / floors(report, c)["decode_ms"] for c in ran if floors(report, c)]
        columns = [
            [c["decode_ms"] / r["decode_ms"] for c, r in paired],
            [r["prefill_s"] / c["prefill_s"] for c, r in paired],
            own,
        ]
        shown = [f"{statistics.median(v):.2f}x{spread(v)}" if v else "-" for v in columns]
        lines.append(f"| {engine} | {length:,} | {' | '.join(shown)} |")
    if several:
        lines += [
            "",
            "- Medians over the rounds, their range in brackets; each ratio is taken within a round (llama.cpp's cell of "
            "the same round), then its median.",
        ]
    return "\n".join(lines)


def race_page(report: dict, doc: Path, table: str, copies: Path) -> str:
    """The markdown section `lminf bench --race --doc` writes, beside its JSON and PNG copies."""
    section = copies.stem.removeprefix(doc.stem + "-")
    versions = sorted({c["version"] for c in report["results"].values() if "version" in c})
    return (
        f"## lminf and llama.cpp on the same GGUF file (`{section}`)\n\n"
        f"Generated by `lminf bench --race --doc {shown(doc)} --section {section}` "
        f"(JSON: `{copies.with_suffix('.json').name}`). Model {report['model']} (its GGUF file, Q4_1 blocks, Q8_0 embeddings), "
        f"the same token ids for every engine, greedy; settings {report['settings']}; engines {report['methods']}"
        f"{' (' + ', '.join(versions) + ')' if versions else ''}.\n\n"
        f"Machine: {report['machine']}. Cells run one after the other.{' ' + report['note'] if report.get('note') else ''}\n\n"
        f"{table}\n\n- In parentheses, the floor: the bytes a decoding step reads (every weight as stored, plus the keys "
        f"and values it attends to) at {bandwidth_said(report)}.\n\n"
        f"![time and memory vs context]({copies.with_suffix('.png').name})\n"
    )
