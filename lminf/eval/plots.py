"""The evaluations' and the benchmark's plots, each drawn from a run's JSON report alone.

Each function writes a PNG and returns the (closed) matplotlib Figure, so callers and tests
can read back what was drawn: every line's label and data, every heatmap's cells.
"""

from __future__ import annotations

import math
from pathlib import Path

from lminf.eval.bench import bench_methods, floors
from lminf.eval.retrieval import accuracy
from lminf.eval.ruler import scores
from lminf.extras import PLOTS, require


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    matplotlib = require("matplotlib", PLOTS, "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_png: Path, **options):
    """Write `fig` to `out_png` (its folder created), close it, and return it."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, **options)
    pyplot().close(fig)
    return fig


def plot_ppl(report: dict, out_png: Path):
    """NLL against position, one panel per document, one line per method, the training length marked."""
    documents = sorted({cell["document"] for cell in report["results"].values()})
    fig, axes = pyplot().subplots(1, len(documents), figsize=(6 * len(documents), 4), squeeze=False)
    for ax, doc in zip(axes[0], documents, strict=True):
        cells = [cell for cell in report["results"].values() if cell["document"] == doc]
        for n, cell in enumerate(cells):
            x = [(k + 0.5) * report["bucket"] for k in range(len(cell["bucket_nll"]))]
            # Methods often coincide: shrinking markers and varied dashes keep each line visible.
            style = dict(marker="o", markersize=7 - 1.5 * (n % 4), linestyle=["-", "--", "-.", ":"][n % 4])
            ax.plot(x, cell["bucket_nll"], label=cell["method"], **style)
        ax.axvline(report["training_length"], color="grey", linestyle="--", label="training length")
        ax.set(title=doc, xlabel="position (tokens)", ylabel="mean NLL (nats/token)")
        ax.legend()
    fig.tight_layout()
    return save(fig, out_png)


def plot_stream(report: dict, out_png: Path):
    """NLL, and memory, against tokens streamed: one line per method."""
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(8, 6), sharex=True)
    for cell in report["results"].values():
        x = [b["end"] for b in cell["buckets"]]
        top.plot(x, [b["nll"] for b in cell["buckets"]], marker="o", markersize=2, label=cell["method"])
        bottom.plot(x, [b["rss_mib"] for b in cell["buckets"]], label=f"{cell['method']} process RSS")
        bottom.plot(x, [b["cache_mib"] for b in cell["buckets"]], linestyle="--", label=f"{cell['method']} KV cache")
    top.set(ylabel="mean NLL per bucket (nats/token)", title=f"streaming ({report.get('document', '')})")
    bottom.set(xlabel="tokens streamed", ylabel="MiB", ylim=(0, None))
    top.legend()
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, out_png)


def plot_grid(report: dict, out_png: Path):
    """One heatmap per method: depth (rows) x length (columns), accuracy in each cell."""
    table = accuracy(report)
    methods = list(table)
    fig, axes = pyplot().subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        lengths = sorted({n for n, _ in table[method]})
        depths = sorted({d for _, d in table[method]})
        grid = [[table[method].get((n, d), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths] if ax is axes[0][0] else [])
        ax.set(title=method, xlabel="prompt length (tokens)")
    axes[0][0].set_ylabel("depth of the secret (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{report['task']} retrieval, {report.get('model', '')}", y=1.04)
    return save(fig, out_png, bbox_inches="tight")


def plot_ruler(report: dict, out_png: Path):
    """One heatmap per method: RULER task (rows) x prompt length (columns), score x100 in each cell."""
    table = scores(report)
    methods = list(table)
    tasks = list(dict.fromkeys(t for cells in table.values() for t, _ in cells))
    lengths = sorted({n for cells in table.values() for _, n in cells})
    fig, axes = pyplot().subplots(
        1, len(methods), figsize=(1.1 * len(lengths) * len(methods) + 3, 0.4 * len(tasks) + 1.6), squeeze=False
    )
    for ax, method in zip(axes[0], methods, strict=True):
        grid = [[table[method].get((t, n), float("nan")) for n in lengths] for t in tasks]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, "" if math.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [])
        ax.set(title=method, xlabel="prompt length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="score (x100)")
    fig.suptitle(f"RULER, {report.get('model', '')}", y=1.02)
    return save(fig, out_png, bbox_inches="tight")


BENCH_FIELDS = (("prefill_s", "prefill (s)"), ("decode_ms", "decode (ms/token)"), ("peak_mib", "peak memory (MiB)"))


FLOOR = "dashed: its floor"


def plot_bench(report: dict, out_png: Path):
    """Prefill time, decode latency and peak memory against context length, log-log, one
    line per method (and its floor, dashed)."""
    methods = bench_methods(report)
    rows = -(-(len(methods) + 1) // 4)  # one legend below the plots, 4 entries a row: inside, many methods hide the lines
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4 + 0.3 * rows))
    handles, has_floor = {}, False
    for ax, (field, label) in zip(axes, BENCH_FIELDS, strict=True):
        for n, method in enumerate(methods):
            cells = [c for c in report["results"].values() if c["method"] == method and field in c]
            cells.sort(key=lambda c: c["tokens"])
            (line,) = ax.plot([c["tokens"] for c in cells], [c[field] for c in cells], marker="o", color=f"C{n}", label=method)
            handles.setdefault(method, line)
            floor = [(c["tokens"], floors(report, c)[field]) for c in cells if field in floors(report, c)]
            if floor:
                ax.plot(*zip(*floor, strict=True), linestyle="--", color=f"C{n}", alpha=0.6, label=f"{method} floor")
                has_floor = True
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=label)
    if has_floor:  # last, in grey: each method's floor is dashed in its colour
        from matplotlib.lines import Line2D

        handles[FLOOR] = Line2D([], [], color="grey", linestyle="--")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"{report.get('model')} on {report.get('machine')}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 * rows + 0.01, 1, 1))
    return save(fig, out_png)
