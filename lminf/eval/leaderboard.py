"""`lminf eval leaderboard`: every method on the same cells, the table a user picks a strategy from.

Rows are methods (lminf.eval.methods). Cells, each at lengths that scale with the model's
training length T (default 2T and 4T):
- nll/L: mean NLL of the tokens at positions L/2 .. L-1 of the first L tokens of a long
  text (the last half of the prompt, all past T when L >= 2T), one pass;
- passkey/L: passkey accuracy (lminf.eval.retrieval.Passkey) over a few depths, in percent;
- ruler/TASK/L: RULER scores (lminf.eval.ruler), x100, for the tasks the default model
  solves at all inside its training length (RULER_TASKS);
- dialogue/C: key recall (%) of SirLLM's synthetic Grocery Shopping dialogues
  (lminf.eval.dialogue) with every method sized to a C-token cache (dialogue.within);
- cost/L: what one prefill of L random tokens and a few decoding steps cost
  (lminf.eval.bench.measure_cell, in its own process): device KV, host KV, prefill
  tokens/s, decode ms/token.

A method that has no value for a cell (xl3m has no per-token NLL and no cache, the
recomputed window no cache, neither a dialogue of turns; vanilla is not run in a cell longer
than --vanilla-up-to) gets "n/a" with the reason in the JSON, never a number. One resumable
JSON (lminf.eval.runs: a finished cell is not rerun; a run of other methods adds their rows),
a heatmap (each column normalised, the raw value written in each cell), a markdown
table and a "which to use when" paragraph generated from the numbers by `RULES`.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf.eval.bench import _in_child, measure_cell
from lminf.eval.dialogue import grocery_cell, within
from lminf.eval.methods import Method, Vanilla, resolve_all
from lminf.eval.retrieval import Passkey, build_prompt
from lminf.eval.ruler import TASKS, Sources, check_room, check_tasks, render
from lminf.eval.ruler import _cell as ruler_cell
from lminf.eval.runs import RunStore, conditions
from lminf.families import training_length

ROWS = "vanilla,window,sinks,lminf,lminf-topk,infllm,longheads,sirllm,xl3m"
# The RULER tasks the default model scores above zero on at its training length (docs/results/ruler.json).
RULER_TASKS = ("niah_single_1", "niah_multivalue", "cwe", "fwe")
MULTIPLES = (2, 4)
COST_LENGTHS = (16384, 32768)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KINDS = ("nll", "passkey", "ruler", "dialogue", "cost")  # in the order a run measures them, method by method


@dataclass(frozen=True)
class Plan:
    """What a leaderboard run measures. Changing `identity()` makes it another run."""

    lengths: tuple[int, ...]  # NLL and passkey lengths (default 2T, 4T)
    ruler_lengths: tuple[int, ...]  # RULER lengths (default 2T)
    cost_lengths: tuple[int, ...] = COST_LENGTHS
    ruler_tasks: tuple[str, ...] = RULER_TASKS
    depths: tuple[float, ...] = DEPTHS
    samples: int = 1  # prompts per (passkey depth) and per RULER task
    dialogue_cache: int = 128  # the cache every method is sized to in the dialogue cell
    episodes: int = 12  # grocery episodes in the dialogue cell (0: no dialogue cell)
    distractors: int = 10  # distractor turns per episode: about 440 tokens, 3.4x a 128-token cache
    seed: int = 0
    vanilla_up_to: int = 16384  # the longest cell vanilla runs (quadratic attention, a cache without bound)
    bench: dict = field(default_factory=dict)  # measure_cell's settings: dtype, device, chunk, decode_tokens, threads, weights
    isolate: bool = True  # cost cells in their own process (their peak memory their own)

    def identity(self) -> dict:
        dialogue = {"cache": self.dialogue_cache, "episodes": self.episodes, "distractors": self.distractors}
        return {"depths": list(self.depths), "samples": self.samples, "seed": self.seed, "bench": self.bench,
                "dialogue": dialogue}  # fmt: skip


@dataclass(frozen=True)
class Column:
    """One column of the table: the value `metric` of the cells named `cell`."""

    cell: str  # e.g. "nll/16384"
    metric: str  # e.g. "nll"
    label: str
    better: str  # "low" or "high"


def columns(plan: Plan) -> list[Column]:
    cols = [Column(f"nll/{n}", "nll", f"NLL {short(n)}", "low") for n in plan.lengths]
    cols += [Column(f"passkey/{n}", "passkey", f"passkey % {short(n)}", "high") for n in plan.lengths]
    cols += [Column(f"ruler/{t}/{n}", "ruler", f"{t} {short(n)}", "high") for n in plan.ruler_lengths for t in plan.ruler_tasks]
    if plan.episodes:
        cols.append(Column(f"dialogue/{plan.dialogue_cache}", "recall", f"dialogue % ({plan.dialogue_cache} cache)", "high"))
    for n in plan.cost_lengths:
        cols += [
            Column(f"cost/{n}", "device_kv_mib", f"KV MiB {short(n)}", "low"),
            Column(f"cost/{n}", "host_kv_mib", f"host KV MiB {short(n)}", "low"),
            Column(f"cost/{n}", "prefill_tok_s", f"prefill tok/s {short(n)}", "high"),
            Column(f"cost/{n}", "decode_ms", f"decode ms {short(n)}", "low"),
        ]
    return cols


def short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def default_plan(model: PreTrainedModel, **overrides) -> Plan:
    """Lengths from the model's training length: NLL and passkey at 2x and 4x, RULER at 2x."""
    t = training_length(model.config)
    lengths = tuple(m * t for m in MULTIPLES)
    return Plan(**{"lengths": lengths, "ruler_lengths": lengths[:1], **overrides})


def run_leaderboard(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[Method],
    plan: Plan,
    text_ids: torch.Tensor,
    sources: Sources | None,
    out_json: Path,
    model_path: str | None = None,
    meta: dict | None = None,
    progress: bool = True,
    kinds: Collection[str] = KINDS,
    remeasure: Collection[str] = (),
) -> dict:
    """Every (method, cell) not already in `out_json`; the JSON is rewritten after each.
    text_ids: (1, n) tokens of the NLL text, n >= max(plan.lengths). sources: RULER's (None
    when plan.ruler_tasks is empty). model_path: what the cost cells load (lminf.default_model.load_model).
    kinds: the kinds of cells run now (the others wait for a later run); remeasure: kinds whose
    finished cells are measured again (e.g. "cost" on a machine with nothing else running)."""
    unknown = sorted((set(kinds) | set(remeasure)) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown cell kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}.")
    if plan.ruler_tasks:
        check_tasks(list(plan.ruler_tasks))
    for task, n in ((t, n) for t in plan.ruler_tasks for n in plan.ruler_lengths):  # too short fails now, not hours in
        smallest = TASKS[task].make(TASKS[task].min_units, random.Random(0), sources, n)
        check_room(TASKS[task], n, len(render(tokenizer, smallest)))
    if text_ids.shape[1] < max(plan.lengths):
        raise ValueError(f"the NLL text has {text_ids.shape[1]} tokens, fewer than the longest length {max(plan.lengths)}.")
    methods = resolve_all(methods, model)
    store = RunStore(out_json, plan.identity(), "holds another leaderboard ({found}); use another --out or the same settings.")
    store.report.update({"training_length": training_length(model.config), **(meta or {})})
    store.report["plan"] = {"lengths": list(plan.lengths), "ruler_lengths": list(plan.ruler_lengths),
                            "cost_lengths": list(plan.cost_lengths), "ruler_tasks": list(plan.ruler_tasks),
                            "vanilla_up_to": plan.vanilla_up_to}  # fmt: skip
    store.report["columns"] = [c.__dict__ for c in columns(plan)]
    store.report["nll_tokens"] = "mean NLL of the tokens at positions L/2 .. L-1 of the text's first L tokens"
    store.record_methods(methods)
    # A run of other methods on the same file adds rows (e.g. the slow longheads rows last), in ROWS' order.
    rows = list(dict.fromkeys([*store.report.get("rows", []), *(m.name for m in methods)]))
    order = ROWS.split(",")
    store.report["rows"] = sorted(rows, key=lambda name: order.index(name) if name in order else len(order))
    stop = {i for i in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    context = multiprocessing.get_context("spawn")
    work: list[tuple[str, int, Callable[[Method], dict]]] = []  # (cell, its length, compute)
    for n in plan.lengths:
        work.append((f"nll/{n}", n, lambda m, n=n: nll_cell(model, m, text_ids[:, :n])))
        work.append((f"passkey/{n}", n, lambda m, n=n: passkey_cell(model, tokenizer, m, n, plan)))
    for n in plan.ruler_lengths:
        for task in plan.ruler_tasks:
            score = lambda m, t=task, n=n: ruler_score(model, tokenizer, m, t, n, plan, sources, stop)  # noqa: E731
            work.append((f"ruler/{task}/{n}", n, score))
    if plan.episodes:  # a few hundred tokens: vanilla runs it too
        work.append((f"dialogue/{plan.dialogue_cache}", 0, lambda m: dialogue_cell(model, tokenizer, m, plan)))
    for n in plan.cost_lengths:
        work.append((f"cost/{n}", n, lambda m, n=n: cost_cell(context, model_path, m, n, plan)))
    cells = [(m, key, n, fn) for m in methods for key, n, fn in work if kind(key) in kinds]
    bar = tqdm(cells, desc="leaderboard", unit="cell", disable=not progress)
    again = {f"{m.name}/{key}" for m, key, _, _ in cells if kind(key) in remeasure}
    for method, key, n, compute in bar:
        name = f"{method.name}/{key}"
        if name in store.results and not store.results[name].get("error") and name not in again:
            continue  # finished in an earlier run
        bar.set_postfix_str(name)
        if isinstance(method, Vanilla) and n > plan.vanilla_up_to:
            # hours of quadratic attention for a model already broken down past its training length (its NLL at 2x shows it)
            cell = {"na": f"vanilla is quadratic, its cache unbounded: not run above --vanilla-up-to {plan.vanilla_up_to}"}
        else:
            cell = measured(compute, method)
        store.put(name, {"method": method.name, "cell": key, **cell, **conditions()})
    return store.report


def kind(cell: str) -> str:
    """A cell's kind: "nll/16384" -> "nll"."""
    return cell.split("/", 1)[0]


def measured(compute: Callable[[Method], dict], method: Method) -> dict:
    """{"values": {...}} of one cell, or {"na": reason} where the method has no value for it."""
    start = time.perf_counter()
    try:
        cell = compute(method)
    except NotImplementedError as error:  # e.g. xl3m's NLL: the method says why
        return {"na": str(error)}
    return {**cell, "seconds": round(time.perf_counter() - start, 2)}


def nll_cell(model: PreTrainedModel, method: Method, ids: torch.Tensor) -> dict:
    """Mean NLL of the tokens at positions L/2 .. L-1 of `ids` (1, L)."""
    n = ids.shape[1]
    nll = method.nll(model, ids, progress=False)  # nll[i] is the NLL of the token at position i + 1
    return {"values": {"nll": float(nll[n // 2 - 1 :].mean())}, "positions": [n // 2, n - 1]}


def passkey_cell(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: Method, length: int, plan: Plan) -> dict:
    """Passkey accuracy (%) over plan.depths x plan.samples prompts of `length` tokens, the same prompts for every method."""
    task, answers = Passkey(), []
    for depth in plan.depths:
        for sample in range(plan.samples):
            ids, answer = build_prompt(task, tokenizer, length, depth, random.Random(f"{plan.seed}/{length}/{depth:g}/{sample}"))
            tokens = method.complete(model, ids.to(model.device), task.max_new_tokens)
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append({"depth": depth, "sample": sample, "answer": answer, "output": output,
                            "correct": task.correct(output, answer)})  # fmt: skip
    return {"values": {"passkey": 100.0 * statistics.mean(a["correct"] for a in answers)}, "prompts": answers}


def ruler_score(model, tokenizer, method: Method, task: str, length: int, plan: Plan, sources: Sources, stop) -> dict:
    """RULER's score (x100) of `task` over plan.samples prompts of `length` tokens (lminf.eval.ruler's cells)."""
    prompts = [ruler_cell(model, tokenizer, method, task, length, s, plan.seed, sources, stop) for s in range(plan.samples)]
    keep = ("sample", "prompt_tokens", "expected", "output", "score")
    mean = 100.0 * statistics.mean(p["score"] for p in prompts)
    return {"values": {"ruler": mean}, "prompts": [{k: p[k] for k in keep} for p in prompts]}


def dialogue_cell(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: Method, plan: Plan) -> dict:
    """Grocery key recall (%) over plan.episodes episodes, `method` sized to plan.dialogue_cache tokens."""
    sized = within(method, plan.dialogue_cache)  # NotImplementedError (n/a) for a method without turns
    played = [grocery_cell(model, tokenizer, sized, e, plan.distractors, plan.seed) for e in range(plan.episodes)]
    keep = ("episode", "key", "picked", "key_correct", "distractors_correct", "tokens")
    recall = 100.0 * statistics.mean(e["key_correct"] for e in played)
    return {"values": {"recall": recall}, "settings": sized.settings(), "episodes": [{k: e[k] for k in keep} for e in played]}


def cost_cell(context, model_path: str | None, method: Method, length: int, plan: Plan) -> dict:
    """lminf bench's measurement of one (method, length): device and host KV, prefill speed, decode step."""
    method.kept_pairs(1)  # raises NotImplementedError, with the reason, for a method with no cache to measure
    args = (model_path, method, length, plan.bench)
    cell = _in_child(context, measure_cell, *args) if plan.isolate else measure_cell(*args)
    if "error" in cell:  # e.g. out of memory: rerun on resume
        return {"na": f"failed: {cell['error']}", "error": True}
    values = {
        "device_kv_mib": cell["cache_mib"],
        "host_kv_mib": cell["host_kv_mib"],
        "prefill_tok_s": length / cell["prefill_s"],
        "decode_ms": cell["decode_ms"],
    }
    return {"values": values, "peak_mib": cell["peak_mib"], "decode_step": cell["decode_step"]}


# -- reading a report -------------------------------------------------------------------------


def value(report: dict, method: str, column: Column) -> float | None:
    cell = report["results"].get(f"{method}/{column.cell}") or {}
    return (cell.get("values") or {}).get(column.metric)


def reason(report: dict, method: str, column: Column) -> str:
    """Why a cell has no value: its recorded reason, or that it has not been run."""
    cell = report["results"].get(f"{method}/{column.cell}")
    return "not run yet" if cell is None else cell.get("na", "")


def report_columns(report: dict) -> list[Column]:
    return [Column(**c) for c in report["columns"]]


def shown(x: float | None, metric: str) -> str:
    if x is None:
        return "n/a"
    if metric in ("passkey", "ruler", "recall", "prefill_tok_s"):
        return f"{x:.0f}"
    return f"{x:.2f}" if metric in ("nll", "decode_ms") else f"{x:.1f}"


def leaderboard_table(report: dict) -> str:
    """Markdown: one row per method, one column per cell; n/a where the method has no value."""
    cols = report_columns(report)
    lines = ["| method | " + " | ".join(c.label for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for method in report["rows"]:
        lines.append(f"| {method} | " + " | ".join(shown(value(report, method, c), c.metric) for c in cols) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Rule:
    """Use the method that wins `metric` at the longest of its lengths, for `purpose`."""

    purpose: str
    metric: str
    cell_kind: str  # "nll", "passkey", "dialogue", "cost"


RULES = (
    Rule("recall far past the training length", "passkey", "passkey"),
    Rule("the best prediction of long text", "nll", "nll"),
    Rule("remembering an early turn of a dialogue", "recall", "dialogue"),
    Rule("the cheapest decoding at long context", "decode_ms", "cost"),
    Rule("the fastest prefill of a long prompt", "prefill_tok_s", "cost"),
    Rule("the least device memory", "device_kv_mib", "cost"),
)


def winners(report: dict, column: Column) -> tuple[list[str], float] | None:
    """The methods with the best value of `column` as the table shows it (ties: all of them) and that
    value; None when no method has one, or when all tie (then the column decides nothing)."""
    values = {m: value(report, m, column) for m in report["rows"]}
    values = {m: v for m, v in values.items() if v is not None and not math.isnan(v)}
    best = (min if column.better == "low" else max)(values.values(), default=None)
    if best is None:
        return None
    names = [m for m, v in values.items() if shown(v, column.metric) == shown(best, column.metric)]
    return None if len(names) == len(values) > 1 else (names, best)


def advice(report: dict) -> str:
    """The "which to use when" paragraph: for each rule, the winner(s) of its column at the longest length measured."""
    sentences = []
    for rule in RULES:
        candidates = [c for c in report_columns(report) if c.metric == rule.metric and c.cell.startswith(rule.cell_kind + "/")]
        if not candidates:
            continue
        column = max(candidates, key=lambda c: int(c.cell.rsplit("/", 1)[1]))
        waiting = [m for m in report["rows"] if f"{m}/{column.cell}" not in report["results"]]
        if waiting:  # a partial run names no winner
            sentences.append(f"For {rule.purpose}, not every method has run yet ({column.label}: {', '.join(waiting)}).")
            continue
        found = winners(report, column)
        if found is None:
            sentences.append(f"For {rule.purpose}, no method stands out ({column.label}).")
            continue
        names, best = found
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        sentences.append(f"For {rule.purpose}, use {who} ({column.label}: {shown(best, column.metric)}).")
    return " ".join(sentences) if sentences else "No cell has a value yet."


def plot_leaderboard(report: dict, out_png: Path):
    """Heatmap methods x cells: colour = the value normalised within its column (1 = best), text = the raw value."""
    from lminf.eval.plots import pyplot, save

    plt = pyplot()
    cols, rows = report_columns(report), report["rows"]
    grid = []
    for method in rows:
        line = []
        for c in cols:
            x = value(report, method, c)
            line.append(math.nan if x is None else x)
        grid.append(line)
    scaled = [[math.nan] * len(cols) for _ in rows]
    for j, c in enumerate(cols):
        known = [grid[i][j] for i in range(len(rows)) if not math.isnan(grid[i][j])]
        if not known:
            continue
        low, high = min(known), max(known)
        for i in range(len(rows)):
            if not math.isnan(grid[i][j]):
                share = 1.0 if high == low else (grid[i][j] - low) / (high - low)
                scaled[i][j] = share if c.better == "high" else 1 - share
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    ax.imshow(torch.tensor(scaled).numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, method in enumerate(rows):
        for j, c in enumerate(cols):
            ax.text(j, i, shown(value(report, method, c), c.metric), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), [c.label for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(f"{report.get('model', '')}: each column normalised, green = best; grey = n/a", fontsize=9)
    fig.tight_layout()
    return save(fig, out_png)


def summary(report: dict) -> str:
    """Markdown: the table, what the NLL cells average, the "which to use when" paragraph, the n/a reasons."""
    table, paragraph = leaderboard_table(report), advice(report)
    cells = [(m, c) for m in report["rows"] for c in report_columns(report)]
    missing = sorted({f"- {m} {c.cell}: {reason(report, m, c)}" for m, c in cells if value(report, m, c) is None})
    return "\n\n".join(
        [table, f"NLL: {report['nll_tokens']}.", paragraph, *(["n/a cells:\n" + "\n".join(missing)] if missing else [])]
    )


def write_outputs(report: dict, out_json: Path) -> tuple[str, Path, Path]:
    """The markdown (summary) beside the JSON, and the heatmap: -> (markdown, md path, png path)."""
    text = summary(report)
    md, png = out_json.with_suffix(".md"), out_json.with_suffix(".png")
    md.write_text(text + "\n")
    plot_leaderboard(report, png)
    return text, md, png


def provenance() -> dict:
    """The command line and the commit of the code that ran (None outside a git checkout)."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {"script": " ".join(["lminf", *sys.argv[1:]]), "commit": commit}
