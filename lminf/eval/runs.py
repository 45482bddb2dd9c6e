"""One resumable JSON run store for every evaluation and the benchmark.

A run is one JSON file: identity fields (what makes two runs the same run, e.g. the bucket
size or the task and seed), metadata (model, machine), each method's settings under
"methods", and the finished cells under "results". `RunStore` loads the file if it exists,
refuses it when its identity differs, skips the cells already finished, and rewrites the
file atomically after each new cell, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers


class RunStore:
    def __init__(self, path: Path, identity: dict, mismatch: str = "holds another run ({found}); use another --out.") -> None:
        """`mismatch`: the error when the file holds a run with other identity fields, after the
        path; formatted with the found fields by name and as {found}."""
        self.path = Path(path)
        self.report: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        found = {key: self.report.get(key) for key in identity}
        if self.report and found != identity:
            raise ValueError(f"{self.path} " + mismatch.format(found=found, **found))
        self.report.update(identity)

    @property
    def results(self) -> dict:
        return self.report.setdefault("results", {})

    def record_methods(self, methods: Sequence) -> None:
        """Each method's settings under "methods"; a method recorded with other settings is an error."""
        recorded = self.report.setdefault("methods", {})
        for method in methods:
            settings = json.loads(json.dumps(method.settings()))  # as the file holds them
            if recorded.get(method.name, settings) != settings:
                raise ValueError(
                    f"{self.path} holds a run of {method.name} with other settings ({recorded[method.name]}); "
                    "use another --out or the same settings."
                )
            recorded[method.name] = settings

    def done(self, key: str, **expect) -> bool:
        """Whether cell `key` was finished by an earlier run (with these field values, if given)."""
        cell = self.results.get(key)
        return cell is not None and all(cell.get(field) == value for field, value in expect.items())

    def cell(self, key: str, compute: Callable[[], dict], **expect) -> dict:
        """Cell `key`: the finished one, or `compute()`d now and saved."""
        if not self.done(key, **expect):
            self.put(key, compute())
        return self.results[key]

    def put(self, key: str, cell: dict) -> None:
        self.results[key] = cell
        self.save()

    def save(self) -> None:
        """Write the file atomically: an interruption leaves the previous version whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2))
        tmp.replace(self.path)


# How one piece of a run was started (e.g. the leaderboard's command line and commit): pieces of
# one run may differ in them; the merged run lists each piece's under "pieces".
INVOCATION = ("script", "commit")
# Lists that name what a piece ran (the leaderboard's rows): the merged run holds their union, in order.
UNION = ("rows",)


def pieces(run: dict) -> list[dict]:
    """The invocations a run was made of: those it lists (a merged run), and its own (the last to write it)."""
    listed, own = list(run.get("pieces") or []), {key: run[key] for key in INVOCATION if key in run}
    return listed + [own] if own and own not in listed else listed


def merge_runs(paths: Sequence[Path], out: Path, about: str | None = None) -> dict:
    """Join runs of one evaluation that were split across processes (e.g. two 1-thread workers
    on a 2-core machine) into `out`: their methods and cells side by side. Nothing is lost or
    silently picked: the runs must agree on every field but their methods and cells, a method
    on its settings, and a cell two runs both hold on its whole content. The runs' "machine"
    may differ (a run resumed on another host): every cell records its own, the first run's is
    kept; so may their INVOCATION fields (listed under "pieces") and UNION lists (joined). `out`
    may be one of `paths` (merging again as workers go on); another existing file is refused.
    `about` is a line saying how the run was made, kept and shown in the report."""
    if len(paths) < 2:
        raise ValueError("merge needs at least two runs.")
    runs = {Path(p): json.loads(Path(p).read_text()) for p in paths}
    (first, merged), *rest = runs.items()
    merged = {**merged, "methods": dict(merged.get("methods") or {}), "results": dict(merged.get("results") or {})}
    merged["pieces"] = pieces(merged)
    for path, run in rest:
        fields = (set(merged) | set(run)) - {"methods", "results", "about", "machine", "pieces", *INVOCATION, *UNION}
        differ = sorted(f for f in fields if merged.get(f) != run.get(f))
        if differ:
            raise ValueError(f"{path} and {first} are not runs of one evaluation: they differ in {', '.join(differ)}.")
        merged["pieces"] += [p for p in pieces(run) if p not in merged["pieces"]]
        for key in UNION:
            if key in merged or key in run:
                merged[key] = list(dict.fromkeys([*merged.get(key, []), *run.get(key, [])]))
        for kind, things in (("method", "methods"), ("cell", "results")):
            for key, value in (run.get(things) or {}).items():
                if merged[things].setdefault(key, value) != value:
                    raise ValueError(f"{path} and {first} both hold {kind} {key}, with different contents.")
    if not merged["pieces"]:
        del merged["pieces"]
    if about:
        merged["about"] = about
    if Path(out).exists() and Path(out).resolve() not in {p.resolve() for p in runs}:
        raise ValueError(f"{out} exists and is not one of the runs merged; merge into a new file or name it among them.")
    store = RunStore(out, {})
    store.report = merged
    store.save()
    return merged


def conditions() -> dict:
    """What a timed cell ran under: a grid may be resumed with other threads or on another machine,
    and may share the machine for a while. When it finished (UTC) and the 1-minute load average
    then (the run's own threads count in it) tell later readers which cells to note as shared."""
    return {
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine() -> str:
    """The machine a run is measured on, in one line (CPU, GPU, threads, library versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} cores)" if names else cpu
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu += f", {torch.cuda.get_device_name()}"
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' * (threads != 1)}, torch {torch.__version__}, transformers {transformers.__version__}"
