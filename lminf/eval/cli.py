"""`lminf data`, `lminf eval ...` and `lminf bench`: the evaluation commands (see lminf.cli for the rest).

Every evaluation writes a JSON file (resumed when it exists) and a PNG beside it, and
prints a table; `lminf eval report` turns the JSON files into docs/results.md. The methods
(`--methods`) come from lminf.eval.methods: the baselines and every registered strategy's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lminf.arguments import add_model_args, add_procedure_args, dtype_for, load
from lminf.default_model import BUILT_IN, DEFAULT_MODEL, model_name
from lminf.eval import leaderboard
from lminf.eval.bench import run_bench
from lminf.eval.data import available, data_dir, extract, find_document, sources
from lminf.eval.methods import method_names, methods_from
from lminf.eval.perplexity import run_ppl, run_stream
from lminf.eval.plots import plot_bench, plot_grid, plot_ppl, plot_ruler, plot_stream
from lminf.eval.race import DECODE_TOKENS as RACE_DECODE_TOKENS
from lminf.eval.race import ENGINES, medians, race_page, race_table, run_race
from lminf.eval.race import LENGTHS as RACE_LENGTHS
from lminf.eval.report import write_report
from lminf.eval.retrieval import Needle, Passkey, run_grid
from lminf.eval.ruler import TASKS, Sources, check_tasks, run_ruler
from lminf.eval.runs import machine, merge_runs
from lminf.eval.tables import bench_page, bench_table, grid_table, ppl_table, ruler_table, stream_table, write_section
from lminf.extras import PLOTS, require

# Default method lists: every method name is accepted (lminf.eval.methods.method_names).
PPL_METHODS, STREAM_METHODS, BENCH_METHODS = "vanilla,lminf,sinks,window", "lminf,sinks", "vanilla,lminf"
BENCH_LENGTHS = "1024,2048,4096,8192,16384,32768"
RULER_METHODS = "lminf"  # the no-flag grid stays small: one method
COMMANDS = ("data", "eval", "bench")
PROMPT_COMMANDS = ("passkey", "needle", "ruler")  # evaluations that only complete prompts


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`lminf data`, `lminf eval ...` and `lminf bench`."""
    data = commands.add_parser("data", help="extract the long public-domain texts the evaluations use")
    data.add_argument("names", nargs="*", help="sources to extract (default: all); see `lminf data --list`")
    data.add_argument("--search", type=Path, action="append", default=[], help="folder with downloaded .deb or archives")
    data.add_argument("--out", type=Path, default=None, help="data folder (default: <lminf cache>/data)")
    data.add_argument("--list", action="store_true", help="list the sources and what each needs")

    evaluate = commands.add_parser("eval", help="evaluations").add_subparsers(dest="evaluation", required=True)
    ppl = evaluate.add_parser("ppl", help="NLL by position over long texts, one pass, all methods side by side")
    ppl.add_argument("documents", nargs="*", help="text files or names from `lminf data` (default: emma paradise-lost)")
    ppl.add_argument("--tokens", type=int, default=32768, help="tokens of each document to score (default 32768)")
    ppl.add_argument("--bucket", type=int, default=2048, help="positions per bucket (default 2048)")
    ppl.add_argument("--methods", default=PPL_METHODS, help=f"comma list of {', '.join(choices('ppl'))}")
    ppl.add_argument("--out", type=Path, default=Path("runs/ppl.json"), help="JSON (resumed if present); PNG beside it")

    stream = evaluate.add_parser("stream", help="NLL, speed and memory over millions of tokens through the bounded cache")
    stream.add_argument("documents", nargs="*", help="texts streamed one after another (default: kjv shakespeare)")
    stream.add_argument("--tokens", type=int, default=1_000_000, help="tokens to stream (default 1,000,000)")
    stream.add_argument("--bucket", type=int, default=32768, help="tokens per reported bucket and checkpoint (default 32768)")
    stream.add_argument("--methods", default=STREAM_METHODS, help=f"comma list of {', '.join(choices('stream'))}")
    stream.add_argument("--out", type=Path, default=Path("runs/stream.json"), help="JSON (resumed if present); PNG beside it")

    for task in ("passkey", "needle"):
        grid = evaluate.add_parser(task, help=f"{task} retrieval accuracy over a grid of lengths and depths")
        if task == "needle":
            grid.add_argument("--document", default=None, help="the haystack text (default: emma, else paradise-lost)")
        else:
            grid.add_argument(
                "--format", choices=["lminf", "original", "longheads"], default="lminf",
                help="original: the LM-Infinite repository's prompt (its prefix, keys 1..10,000,000); longheads: the "
                "LongHeads repository's (its prefix, keys 1..50,000)",
            )  # fmt: skip
        grid.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens (default 1024,2048,4096)")
        grid.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the secret sits, 0 = start, 1 = end")
        grid.add_argument("--samples", type=int, default=2, help="prompts per cell, each with its own secret (default 2)")
        grid.add_argument("--seed", type=int, default=0)
        grid.add_argument(
            "--methods",
            default=",".join(method_names()),
            help=f"comma list of {', '.join(choices(task))} (default: all but xl3m)",
        )
        grid.add_argument("--out", type=Path, default=Path(f"runs/{task}.json"), help="JSON (resumed if present); PNG beside it")

    ruler = evaluate.add_parser("ruler", help="RULER's synthetic tasks (needles, variable tracking, word counts), offline")
    ruler.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)} (default: all)")
    ruler.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens (default 4096,8192)")
    ruler.add_argument("--samples", type=int, default=1, help="prompts per (task, length), each its own draw (default 1)")
    ruler.add_argument("--seed", type=int, default=0)
    ruler.add_argument(
        "--document", default=None, help="the real-text haystack (default: emma, paradise-lost, else Python's manual)"
    )
    ruler.add_argument(
        "--methods", default=RULER_METHODS, help=f"comma list of {', '.join(choices('ruler'))} (default {RULER_METHODS})"
    )
    ruler.add_argument("--out", type=Path, default=Path("runs/ruler.json"), help="JSON (resumed if present); PNG beside it")

    merge = evaluate.add_parser("merge", help="join the JSON files of one evaluation split across processes")
    merge.add_argument("runs", type=Path, nargs="+", help="the runs' JSON files (two or more)")
    merge.add_argument("--out", type=Path, required=True, help="the joined JSON (may be one of the runs; no other existing file)")
    merge.add_argument("--about", default=None, help="how the run was made, kept in the JSON and shown in the report")

    report = evaluate.add_parser("report", help="write docs/results.md from the evaluations' JSON files")
    report.add_argument("--runs", type=Path, default=Path("runs"), help="folder with ppl.json, stream.json, passkey.json, ...")
    report.add_argument("--out", type=Path, default=Path("docs/results.md"))

    # One pass uses the training length; streaming and retrieval default to a 1k window so that
    # millions of tokens and 4x the window stay affordable on a laptop CPU.
    windows = {"ppl": None, "stream": 1024, "passkey": 1024, "needle": 1024, "ruler": None}
    for name, window in windows.items():
        parser = evaluate.choices[name]
        # top_k is the paper's k = 5, for the lminf-topk method; the other methods ignore it.
        add_model_args(parser, n_local=window, top_k=5, vanilla=False, strategy=False)
        if name in PROMPT_COMMANDS:
            add_procedure_args(parser)
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _add_leaderboard(evaluate)
    _add_bench(commands)


def _add_leaderboard(evaluate: argparse._SubParsersAction) -> None:
    board = evaluate.add_parser("leaderboard", help="every method on the same cells: NLL, passkey, RULER and cost, one table")
    rows = leaderboard.ROWS
    board.add_argument("--methods", default=rows, help=f"comma list of {', '.join(choices('leaderboard'))} (default: {rows})")
    board.add_argument("--lengths", default=None, help="NLL and passkey lengths (default: 2x and 4x the training length)")
    board.add_argument("--ruler-lengths", default=None, help="RULER lengths (default: 2x the training length)")
    board.add_argument("--ruler-tasks", default=",".join(leaderboard.RULER_TASKS), help="comma list of RULER tasks ('' for none)")
    costs, depths = ",".join(map(str, leaderboard.COST_LENGTHS)), ",".join(f"{d:g}" for d in leaderboard.DEPTHS)
    board.add_argument("--cost-lengths", default=costs, help=f"lengths of the cost cells, as lminf bench (default {costs})")
    board.add_argument("--depths", default=depths, help="passkey depths, 0 = start, 1 = end")
    board.add_argument("--samples", type=int, default=1, help="prompts per passkey depth and per RULER task (default 1)")
    board.add_argument("--seed", type=int, default=0)
    board.add_argument("--document", default=None, help="the NLL text and RULER's haystack (default: emma, else paradise-lost)")
    plan = leaderboard.Plan
    board.add_argument("--dialogue-cache", type=int, default=plan.dialogue_cache, help="the dialogue cell's cache size")
    board.add_argument("--episodes", type=int, default=plan.episodes, help="grocery episodes of the dialogue cell (0: none)")
    board.add_argument("--distractors", type=int, default=plan.distractors, help="distractor turns per grocery episode")
    board.add_argument("--vanilla-up-to", type=int, default=16384, help="longest cell vanilla runs (it is quadratic)")
    board.add_argument("--decode-tokens", type=int, default=16, help="decoding steps per cost cell, the median reported")
    board.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens per prefill step in the cost cells")
    board.add_argument("--out", type=Path, default=Path("runs/leaderboard.json"), help="JSON (resumed); .md and .png beside it")
    kinds = ",".join(leaderboard.KINDS)
    board.add_argument("--cells", default=kinds, help=f"kinds of cells to run now, a comma list of {kinds} (default: all)")
    board.add_argument("--remeasure", default="", help="kinds of cells measured again though finished (e.g. cost, machine idle)")
    add_model_args(board, top_k=5, vanilla=False, strategy=False)
    add_procedure_args(board)
    board.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="prefill time, decode latency and peak memory vs context, method by method")
    bench.add_argument(
        "--race",
        action="store_true",
        help="lminf's engines (lminf.eval.race.ENGINES: float32, --weights gguf, with --kv-dtype bfloat16...) "
        "against llama.cpp on the default model's GGUF file and one prompt (needs pip install 'lminf[race]' for llama.cpp)",
    )
    bench.add_argument(
        "--lengths",
        default=None,
        help=f"context lengths (comma list; default {BENCH_LENGTHS}, with --race {','.join(map(str, RACE_LENGTHS))})",
    )
    bench.add_argument(
        "--methods",
        default=None,
        help=f"comma list of {', '.join(choices('bench'))} (default {BENCH_METHODS}); with --race, of its engines (default all)",
    )
    bench.add_argument(
        "--decode-tokens", type=int, default=None, help="decode steps per cell, the median reported (default 32, with --race 64)"
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="with --race: run every cell this many times, round after round; the tables show medians and ranges, "
        "ratios taken within a round (default 1; more rounds extend a finished run)",
    )
    bench.add_argument("--vanilla-up-to", type=int, default=16384, help="longest context vanilla runs at (it is quadratic)")
    bench.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens per prefill step")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument(
        "--out", type=Path, default=None, help="JSON (resumed if present; default runs/bench.json, runs/race.json); PNG beside it"
    )
    bench.add_argument("--doc", type=Path, default=None, help="also write this markdown page (e.g. docs/benchmarks.md)")
    bench.add_argument(
        "--section", default="bench", help="the page's section to (re)write (default bench); another name keeps that one"
    )
    bench.add_argument("--note", default=None, help="conditions worth knowing (e.g. other load), kept in the JSON and page")
    add_model_args(bench, vanilla=False, strategy=False)


def choices(command: str) -> list[str]:
    """The method names a command accepts: every one, but streaming runs only strategies (the
    baselines have no bounded cache), the benchmark no recomputed window (it has no cache), and
    xl3m only completes prompts (passkey, needle, ruler)."""
    if command in (*PROMPT_COMMANDS, "leaderboard"):
        return method_names(procedures=True)
    return {"stream": method_names(vanilla=False, window=False), "bench": method_names(window=False)}.get(command, method_names())


def run(args: argparse.Namespace) -> int:
    """Dispatch `lminf data` / `lminf eval X` / `lminf bench`."""
    if args.command == "data":
        return data_command(args)
    if getattr(args, "evaluation", None) != "merge":  # the rest draw plots: fail before a long run, not after it
        require("matplotlib", PLOTS, "eval")
    if args.command == "bench":
        return bench_command(args)
    if args.evaluation == "report":
        print(f"wrote {write_report(args.runs, args.out)}", file=sys.stderr)
        return 0
    if args.evaluation == "merge":
        report = merge_runs(args.runs, args.out, args.about)
        print(f"wrote {args.out}: {len(report['results'])} cells of {', '.join(report['methods'])}", file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"ppl": eval_ppl, "stream": eval_stream, "passkey": eval_grid, "needle": eval_grid, "ruler": eval_ruler}
    commands["leaderboard"] = eval_leaderboard
    return commands[args.evaluation](args)


def data_command(args: argparse.Namespace) -> int:
    if args.list:
        for source in sources().values():
            print(f"{source.name:22} {source.title}\n{'':22} from {source.origin}; {source.license}")
            print(f"{'':22} needs: {source.install}")
        return 0
    status = extract(args.names or None, args.out, args.search)
    for name, state in status.items():
        print(f"{name:22} {state}")
    print(f"texts in {args.out or data_dir()}", file=sys.stderr)
    ok = [s == "ok" for s in status.values()]
    return 0 if (all(ok) if args.names else any(ok)) else 1


def eval_ppl(args: argparse.Namespace) -> int:
    methods = methods_from(args.methods, args, choices("ppl"))
    if args.tokens < 2 or args.bucket < 1:
        raise ValueError("--tokens must be >= 2 and --bucket >= 1.")
    model, tokenizer = load(args, patched=False)  # each method patches and unpatches the model itself
    documents = {}
    for name in args.documents or ["emma", "paradise-lost"]:
        path, ids = _tokenized(tokenizer, name)
        if ids.shape[1] < args.tokens:
            raise ValueError(f"{path} has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}.")
        documents[path.stem] = ids[:, : args.tokens].to(args.device)
    report = run_ppl(model, documents, methods, args.bucket, args.out, _meta(args, model))
    return _finish(args.out, report, plot_ppl, ppl_table)


def eval_stream(args: argparse.Namespace) -> int:
    methods = methods_from(args.methods, args, choices("stream"))
    if args.tokens < 2 or args.bucket < 1:
        raise ValueError("--tokens must be >= 2 and --bucket >= 1.")
    model, tokenizer = load(args, patched=False)
    names = args.documents or ["kjv", "shakespeare"]
    parts, have = [], 0
    for name in names:  # stop reading as soon as there are enough tokens
        if have >= args.tokens:
            break
        ids = _tokenized(tokenizer, name)[1]
        parts.append(ids)
        have += ids.shape[1]
    if have < args.tokens:
        raise ValueError(f"{' + '.join(names)} hold {have} tokens, fewer than --tokens {args.tokens}; add documents.")
    ids = torch.cat(parts, dim=1)[:, : args.tokens].to(args.device)
    meta = {**_meta(args, model), "document": " + ".join(names[: len(parts)])}
    for method in methods:
        report = run_stream(model, ids, method, args.bucket, args.out, meta=meta)
    return _finish(args.out, report, plot_stream, stream_table)


def eval_grid(args: argparse.Namespace) -> int:
    methods = methods_from(args.methods, args, choices(args.evaluation))
    lengths = numbers(args.lengths, int, "--lengths")
    depths = numbers(args.depths, float, "--depths")
    if args.samples < 1 or min(lengths) < 1 or not all(0 <= d <= 1 for d in depths):
        raise ValueError("--samples and --lengths must be >= 1 and --depths in [0, 1].")
    model, tokenizer = load(args, patched=False)
    if args.evaluation == "passkey":
        task = Passkey(args.format)
    else:
        document = args.document or next((d for d in ("emma", "paradise-lost") if d in available()), "emma")
        path, ids = _tokenized(tokenizer, document)
        task = Needle(ids[0].tolist(), path.stem)
    report = run_grid(model, tokenizer, task, methods, lengths, depths, args.samples, args.seed, args.out, _meta(args, model))
    return _finish(args.out, report, plot_grid, grid_table)


def eval_ruler(args: argparse.Namespace) -> int:
    methods = methods_from(args.methods, args, choices("ruler"))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_tasks(tasks)
    lengths = numbers(args.lengths, int, "--lengths")
    if args.samples < 1 or min(lengths) < 1:
        raise ValueError("--samples and --lengths must be >= 1.")
    model, tokenizer = load(args, patched=False)
    document, text = _haystack(args.document)
    sources = Sources.load(text, document)
    report = run_ruler(model, tokenizer, methods, tasks, lengths, args.samples, args.seed, sources, args.out, _meta(args, model))
    return _finish(args.out, report, plot_ruler, ruler_table)


def _bench_settings(args: argparse.Namespace) -> dict:
    """What a cost measurement runs under (lminf bench and the leaderboard's cost cells)."""
    return {
        "dtype": str(dtype_for(args.dtype, args.device)).removeprefix("torch."),
        "device": args.device,
        "chunk": args.chunk_size,
        "decode_tokens": args.decode_tokens,
        "threads": args.threads,
        "weights": args.weights,
    }


def eval_leaderboard(args: argparse.Namespace) -> int:
    methods = methods_from(args.methods, args, choices("leaderboard"))
    model, tokenizer = load(args, patched=False)
    bench = _bench_settings(args)
    overrides = {
        "cost_lengths": tuple(numbers(args.cost_lengths, int, "--cost-lengths")),
        "ruler_tasks": tuple(t.strip() for t in args.ruler_tasks.split(",") if t.strip()),
        "dialogue_cache": args.dialogue_cache,
        "episodes": args.episodes,
        "distractors": args.distractors,
        "depths": tuple(numbers(args.depths, float, "--depths")),
        "samples": args.samples,
        "seed": args.seed,
        "vanilla_up_to": args.vanilla_up_to,
        "bench": bench,
    }
    if args.lengths:
        overrides["lengths"] = tuple(numbers(args.lengths, int, "--lengths"))
        overrides["ruler_lengths"] = overrides["lengths"][:1]
    if args.ruler_lengths:
        overrides["ruler_lengths"] = tuple(numbers(args.ruler_lengths, int, "--ruler-lengths"))
    plan = leaderboard.default_plan(model, **overrides)
    if args.episodes < 0 or args.dialogue_cache < 16:
        raise ValueError("--episodes must be >= 0 and --dialogue-cache >= 16.")
    if args.samples < 1 or not all(0 <= d <= 1 for d in plan.depths) or args.decode_tokens < 1 or args.chunk_size < 1:
        raise ValueError("--samples, --decode-tokens, --chunk-size must be >= 1 and --depths in [0, 1].")
    document = args.document or next((d for d in ("emma", "paradise-lost") if d in available()), "emma")
    path, ids = _tokenized(tokenizer, document)
    name, text = _haystack(document)
    sources = Sources.load(text, name) if plan.ruler_tasks else None
    meta = {**_meta(args, model), **leaderboard.provenance(), "document": path.stem}
    ids = ids.to(args.device)
    kinds, again = (tuple(k.strip() for k in text.split(",") if k.strip()) for text in (args.cells, args.remeasure))
    report = leaderboard.run_leaderboard(
        model, tokenizer, methods, plan, ids, sources, args.out, args.model, meta, kinds=kinds, remeasure=again
    )
    text, md, png = leaderboard.write_outputs(report, args.out)
    print(text)
    print(f"wrote {args.out}, {md} and {png}", file=sys.stderr)
    return 0


def _haystack(name: str | None) -> tuple[str, str]:
    """(name, text) of RULER's real-text haystack: the one asked for, else a book from `lminf
    data`, else Python's reference manual (in every Python install)."""
    if name is None:
        name = next((d for d in ("emma", "paradise-lost") if d in available()), None)
    if name is None:
        import pydoc_data.topics

        return "python-manual", "\n\n".join(pydoc_data.topics.topics.values())
    path = find_document(name)
    return path.stem, path.read_text(encoding="utf-8", errors="replace")


def bench_command(args: argparse.Namespace) -> int:
    lengths = numbers(args.lengths or (",".join(map(str, RACE_LENGTHS)) if args.race else BENCH_LENGTHS), int, "--lengths")
    if args.decode_tokens is None:  # the race's protocol: 64 greedy tokens
        args.decode_tokens = RACE_DECODE_TOKENS if args.race else 32
    if min(lengths) < 1 or args.decode_tokens < 1 or args.chunk_size < 1:
        raise ValueError("--lengths, --decode-tokens and --chunk-size must be >= 1.")
    args.out = args.out or Path("runs/race.json" if args.race else "runs/bench.json")
    if args.race:
        return race_command(args, lengths)
    if args.rounds is not None:
        raise ValueError("--rounds is for --race (lminf bench runs each cell once).")
    methods = methods_from(args.methods or BENCH_METHODS, args, choices("bench"))
    settings = _bench_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # so that the machine line says what the children use
    meta = {"model": model_name(args.model), "machine": machine()}
    if args.note:
        meta["note"] = args.note
    report = run_bench(args.model, methods, lengths, settings, args.vanilla_up_to, args.out, meta)
    png = args.out.with_suffix(".png")
    plot_bench(report, png)
    table = bench_table(report)
    print(table)
    if args.doc:  # a page with its own copies of the JSON and the plot (named after the section, if not "bench")
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        copies = args.doc if args.section == "bench" else args.doc.with_name(f"{args.doc.stem}-{args.section}.md")
        copies.with_suffix(".json").write_text(json.dumps(report, indent=2))
        plot_bench(report, copies.with_suffix(".png"))
        write_section(args.doc, args.section, bench_page(report, args.doc, table, copies))
    print(f"wrote {args.out} and {png}" + (f" and {args.doc}" if args.doc else ""), file=sys.stderr)
    return 0


def race_command(args: argparse.Namespace, lengths: list[int]) -> int:
    own = args.weights != "dense" or args.kv_dtype or args.kernel != "auto"
    if args.model or own or args.device != "cpu" or args.dtype not in ("auto", "float32"):
        flags = "--weights, --kv-dtype, --kernel"
        raise ValueError(f"--race runs the default model on CPU in float32 with its own {flags}: drop those flags.")
    settings = {"chunk": args.chunk_size, "decode_tokens": args.decode_tokens, "threads": args.threads}
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"model": model_name(None), "machine": machine(), **({"note": args.note} if args.note else {})}
    engines = [e.strip() for e in (args.methods or ",".join(ENGINES)).split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise ValueError(f"--race --methods takes a comma list of {', '.join(ENGINES)}; got {args.methods!r}.")
    report = run_race(lengths, settings, args.out, meta, engines, args.rounds or 1)
    table = race_table(report)
    plot_bench(medians(report), args.out.with_suffix(".png"))
    print(table)
    if args.doc:  # its own section of the page (default "race"), with copies of the JSON and plot named after it
        section = "race" if args.section == "bench" else args.section
        copies = args.doc.with_name(f"{args.doc.stem}-{section}.md")
        copies.with_suffix(".json").write_text(json.dumps(report, indent=2))
        plot_bench(medians(report), copies.with_suffix(".png"))
        write_section(args.doc, section, race_page(report, args.doc, table, copies))
    print(f"wrote {args.out}" + (f" and {args.doc}" if args.doc else ""), file=sys.stderr)
    return 0


def _finish(out: Path, report: dict, plot, table) -> int:
    """The PNG beside the JSON, and the table on stdout."""
    plot(report, out.with_suffix(".png"))
    print(table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def _tokenized(tokenizer, name: str) -> tuple[Path, torch.Tensor]:
    path = find_document(name)
    return path, tokenizer(path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt")["input_ids"]


def numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise ValueError(f"{flag} must be a comma list of numbers, got {text!r}.") from error
    if not values:
        raise ValueError(f"{flag} is empty.")
    return values


def _meta(args: argparse.Namespace, model) -> dict:
    meta = {"model": model_name(args.model), "dtype": str(model.dtype), "weights": args.weights, "machine": machine()}
    built_in = BUILT_IN.get(args.model or DEFAULT_MODEL)
    if built_in is not None:  # what the weights are (e.g. de-quantized GGUF), beside every figure
        meta["model_about"] = built_in.about
    return meta
