"""Markdown tables of the runs' JSON reports, printed by the CLI and used by the report."""

from __future__ import annotations

from pathlib import Path

from lminf.eval.bench import bandwidth_said, bench_methods, floors
from lminf.eval.retrieval import accuracy
from lminf.eval.ruler import TASKS, scores


def method_settings(report: dict) -> dict[str, dict]:
    """Each method's recorded settings: the run's "methods", overridden by those its cells
    recorded (resolved for the model; older runs record them only there)."""
    found = dict(report.get("methods") or {})
    for cell in report["results"].values():
        if "settings" in cell:
            found[cell["method"]] = cell["settings"]
    return found


def settings_line(report: dict) -> str:
    """'name {settings}; ...' for every method that has settings ('' when none has)."""
    return "; ".join(f"{name} {settings}" for name, settings in method_settings(report).items() if settings)


def ppl_table(report: dict) -> str:
    bucket, lines = report["bucket"], []
    for doc in sorted({c["document"] for c in report["results"].values()}):
        cells = [c for c in report["results"].values() if c["document"] == doc]
        lines += [f"\n{doc}\n", f"| positions | {' | '.join(c['method'] for c in cells)} |", f"|---|{'---|' * len(cells)}"]
        for k in range(max(len(c["bucket_nll"]) for c in cells)):
            row = " | ".join(f"{c['bucket_nll'][k]:.2f}" if k < len(c["bucket_nll"]) else "" for c in cells)
            lines.append(f"| {k * bucket}-{(k + 1) * bucket} | {row} |")
    return "\n".join(lines)


def stream_table(report: dict) -> str:
    lines = ["| method | tokens | mean NLL first bucket | mean NLL last bucket | tokens/s | KV cache MiB | RSS MiB (min-max) |"]
    lines.append("|---|---|---|---|---|---|---|")
    for cell in report["results"].values():
        b = cell["buckets"]
        rss = [x["rss_mib"] for x in b]
        lines.append(
            f"| {cell['method']} | {cell['tokens']:,} | {b[0]['nll']:.2f} | {b[-1]['nll']:.2f} | "
            f"{sum(x['tokens'] for x in b) / sum(x['tokens'] / x['tokens_per_s'] for x in b):.0f} | "
            f"{max(x['cache_mib'] for x in b):.1f} | {min(rss):.0f}-{max(rss):.0f} |"
        )
    return "\n".join(lines)


def grid_table(report: dict) -> str:
    table = accuracy(report)
    lengths = sorted({n for cells in table.values() for n, _ in cells})
    lines = [f"| method | {' | '.join(str(n) for n in lengths)} | all |", f"|---|{'---|' * (len(lengths) + 1)}"]
    for method, cells in table.items():
        by_length = [[v for (n, _), v in cells.items() if n == length] for length in lengths]
        row = " | ".join(f"{sum(v) / len(v):.2f}" if v else "" for v in by_length)
        lines.append(f"| {method} | {row} | {sum(cells.values()) / len(cells):.2f} |")
    return "\n".join(lines)


def ruler_table(report: dict) -> str:
    """RULER scores (x100) like kvpress's leaderboard: one row per (method, length), one column
    per task, then the mean over the tasks the row has."""
    table = scores(report)
    tasks = [t for t in TASKS if any(t == task for cells in table.values() for task, _ in cells)]
    lines = [f"| method | length | {' | '.join(tasks)} | average |", f"|---|---:|{'---:|' * (len(tasks) + 1)}"]
    for method, cells in table.items():
        for length in sorted({n for _, n in cells}):
            row = [cells.get((task, length)) for task in tasks]
            known = [v for v in row if v is not None]
            shown = " | ".join("" if v is None else f"{v:.0f}" for v in row)
            lines.append(f"| {method} | {length:,} | {shown} | {sum(known) / len(known):.1f} |")
    return "\n".join(lines)


BENCH_COLUMNS = (
    ("prefill_s", "prefill s", "{:.1f}"),
    ("decode_ms", "decode ms/token", "{:.0f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("cache_mib", "KV cache MiB", "{:.0f}"),
    ("host_kv_mib", "host KV MiB", "{:.0f}"),  # InfLLM's blocks in host memory
)


def bench_table(report: dict) -> str:
    """One row per context length; for each measure, one column per method, its floor in parentheses."""
    methods = bench_methods(report)
    header = " | ".join(f"{label} {method}" for _, label, _ in BENCH_COLUMNS for method in methods)
    lines = [f"| tokens | {header} |", "|---|" + "---|" * (len(BENCH_COLUMNS) * len(methods))]
    for length in sorted({c["tokens"] for c in report["results"].values()}):
        cells = [report["results"].get(f"{m}/{length}", {}) for m in methods]
        row = [str(length)]
        for field, _, fmt in BENCH_COLUMNS:
            for c in cells:
                if field not in c:
                    row.append("not run" if "skipped" in c else "failed" if "error" in c else "-")
                    continue
                floor = floors(report, c).get(field)
                row.append(fmt.format(c[field]) + ("" if floor is None else f" ({fmt.format(floor)})"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + _bench_notes(report))


def _bench_notes(report: dict) -> list[str]:
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
            f"values it attends to) at {bandwidth_said(report)}."
        )
    return [""] + notes if notes else []


def write_section(doc: Path, name: str, text: str) -> None:
    """Write `text` as the section `name` of a generated page and keep its other sections:
    docs/benchmarks.md holds `lminf bench`'s section and the serving benchmark's."""
    begin, end = f"<!-- {name}: generated, do not edit -->", f"<!-- /{name} -->"
    old = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old + ("\n" if old else "") + block
    doc.write_text(new)


def shown(doc: Path) -> str:
    """`doc` as a generated page names it: relative to the working folder where it lies inside it, so
    the page does not carry one checkout's absolute path."""
    try:
        return str(doc.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(doc)


def bench_page(report: dict, doc: Path, table: str, copies: Path | None = None) -> str:
    """The markdown section `lminf bench --doc` writes, beside its JSON and PNG copies (named as `copies`)."""
    settings = settings_line(report)
    copies = copies or doc
    section = "" if copies == doc else f" --section {copies.stem.removeprefix(doc.stem + '-')}"
    title = "# Benchmarks" if copies == doc else f"## {', '.join(bench_methods(report))} side by side"
    return (
        f"{title}\n\nGenerated by `lminf bench --doc {shown(doc)}{section}` (JSON: `{copies.with_suffix('.json').name}`). "
        f"Model {report['model']}, settings {report['settings']}{'; methods: ' + settings if settings else ''}.\n\n"
        f"Machine: {report['machine']}.{' ' + report['note'] if report.get('note') else ''}\n\n{table}\n\n"
        f"![time and memory vs context]({copies.with_suffix('.png').name})\n"
    )
