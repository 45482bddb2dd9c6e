"""lminf's longheads and sirllm against the outputs of their authors' own code (run in lminf's venv).

checks/authors/run.sh writes the authors' outputs first (longheads.pt, sirllm.pt); this runs lminf's
strategies on the same token ids with the same settings, and negative controls with one setting changed,
prints a table and writes a JSON. LongHeads' prefill logits come from the final hidden states the
authors' run recorded, times the model's (tied) embedding matrix, as their lm_head computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lminf
from lminf.generation import cache_kwarg

ROOT = Path(__file__).resolve().parents[2]
NOISE = 1e-3  # a prompt position whose logits differ by more is counted


def longheads_settings(authors: dict) -> dict:
    """lminf's names for the settings the authors' run used."""
    s = authors["settings"]
    return {"chunk_tokens": s["window_size"], "attention_length": s["atten_length"], "select_from": s["begin_selective_length"]}


def sirllm_settings(authors: dict) -> dict:
    s = authors["settings"]
    return {"n_global": s["start_size"], "n_scored": s["token_entropy_size"], "n_local": s["recent_size"],
            "decay": s["decay_ratio"], "score": "released"}


@torch.no_grad()
def compare_longheads(model, authors: dict, embedding: torch.Tensor, settings: dict, prefill_chunk: int) -> dict:
    """Prefill in calls of `prefill_chunk` tokens, then one-token decode steps fed lminf's own greedy tokens."""
    lminf.patch(model, "longheads", **settings)
    try:
        cache = lminf.make_cache(model)
        ids = authors["input_ids"][None]
        select_from = authors["settings"]["begin_selective_length"]
        dense = selective = 0.0
        argmax_equal, over, start = 0, 0, time.perf_counter()
        for a in range(0, ids.shape[1], prefill_chunk):
            logits = model(ids[:, a : a + prefill_chunk], **cache_kwarg(model, cache), use_cache=True).logits[0]
            theirs = authors["prefill_hidden"][a : a + prefill_chunk] @ embedding.T
            diff = (logits - theirs).abs().amax(-1)
            split = max(0, min(select_from - a, len(diff)))
            dense = max(dense, float(diff[:split].max()) if split else 0.0)
            selective = max(selective, float(diff[split:].max()) if split < len(diff) else 0.0)
            argmax_equal += int((logits.argmax(-1) == authors["prefill_argmax"][a : a + prefill_chunk]).sum())
            over += int((diff > NOISE).sum())
        tokens, decode = [int(logits[-1].argmax())], 0.0
        for step_logits in authors["decode_logits"]:
            logits = model(torch.tensor([[tokens[-1]]]), **cache_kwarg(model, cache), use_cache=True).logits[0, -1]
            decode = max(decode, float((logits - step_logits).abs().max()))
            tokens.append(int(logits.argmax()))
        return {
            "settings": settings, "max_logit_diff": {"dense": dense, "selective": selective, "decode": decode},
            "argmax_equal": argmax_equal / ids.shape[1], f"positions_over_{NOISE:g}": over, "greedy_tokens": tokens,
            "greedy_equal": tokens == authors["greedy_tokens"], "seconds": time.perf_counter() - start,
        }
    finally:
        lminf.unpatch(model)


@torch.no_grad()
def compare_sirllm(model, authors: dict, settings: dict) -> dict:
    """One forward per turn, each announced to the cache first (eviction, then decay), as the authors' loop does."""
    from lminf.caches.turn_cache import begin_turn

    lminf.patch(model, "sirllm", **settings)
    try:
        cache = lminf.make_cache(model)
        logit_diff = score_diff = 0.0
        kept_equal = evictions = argmax_equal = tokens = 0
        start = time.perf_counter()
        for turn in authors["turns"]:
            ids = torch.tensor([turn["input_ids"]])
            begin_turn(cache, ids.shape[1])
            layer = cache.scored[0]
            kept = layer.positions[0].tolist() if layer.is_initialized else []
            if len(turn["kept_positions"]) < turn["cache_before"]:  # the authors' cache evicted before this turn
                evictions += 1
                kept_equal += kept == turn["kept_positions"]
            if turn["scores_before"] is not None and cache.scores is not None and len(kept) == len(turn["kept_positions"]):
                scores = torch.tensor(turn["scores_before"], dtype=torch.float64)
                score_diff = max(score_diff, float((cache.scores[0] - scores).abs().max()))
            logits = model(ids, **cache_kwarg(model, cache), use_cache=True).logits[0]
            logit_diff = max(logit_diff, float((logits - turn["logits"]).abs().max()))
            argmax_equal += int((logits.argmax(-1) == turn["logits"].argmax(-1)).sum())
            tokens += ids.shape[1]
        return {
            "settings": settings, "max_logit_diff": logit_diff, "max_score_diff": score_diff,
            "kept_equal": f"{kept_equal}/{evictions}", "argmax_equal": argmax_equal / tokens,
            "seconds": time.perf_counter() - start,
        }
    finally:
        lminf.unpatch(model)


def attempt(name: str, run, *args) -> dict:
    """A row, or why lminf's side could not run (a strategy not in this lminf yet)."""
    try:
        return {"name": name, **run(*args)}
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        return {"name": name, "error": f"{type(error).__name__}: {error}"}


def _by_strategy(report: dict) -> dict:
    """{strategy: the lminf commit its rows came from} of a JSON this script wrote."""
    commit = report["commit"]
    return dict(commit) if isinstance(commit, dict) else {name: commit for name in report["authors"]}


def print_table(rows: list[dict]) -> None:
    print(f"{'run':44s} {'max |logit diff|':>34s} {'argmax eq':>9s}  greedy / kept")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:44s} not run: {row['error'][:120]}")
            continue
        diff = row["max_logit_diff"]
        if isinstance(diff, dict):
            shown, extra = " ".join(f"{k} {v:.1e}" for k, v in diff.items()), f"greedy equal {row['greedy_equal']}"
        else:
            shown, extra = f"{diff:.1e}", f"same kept after {row['kept_equal']} evictions, scores {row['max_score_diff']:.1e}"
        print(f"{row['name']:44s} {shown:>34s} {row['argmax_equal']:9.4f}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "authors", help="where run.sh wrote the authors' outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "authors-check.json")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per lminf forward call")
    parser.add_argument("--only", choices=("longheads", "sirllm"), help="compare one strategy")
    args = parser.parse_args()

    inputs = json.loads((args.runs / "inputs.json").read_text())
    model, _ = lminf.load_default()
    embedding = load_file(Path(inputs["model_folder"]) / "model.safetensors")["model.embed_tokens.weight"]
    rows, authors = [], {}
    if args.only != "sirllm":
        authors["longheads"] = torch.load(args.runs / "longheads.pt", weights_only=False)
        same = longheads_settings(authors["longheads"])
        control = {**same, "chunk_tokens": same["chunk_tokens"] // 2}
        rows.append(attempt("longheads, the authors' settings", compare_longheads, model, authors["longheads"],
                            embedding, same, args.prefill_chunk))
        rows.append(attempt(f"longheads chunk_tokens {control['chunk_tokens']} (control)", compare_longheads, model,
                            authors["longheads"], embedding, control, args.prefill_chunk))
    if args.only != "longheads":
        authors["sirllm"] = torch.load(args.runs / "sirllm.pt", weights_only=False)
        same = sirllm_settings(authors["sirllm"])
        rows.append(attempt("sirllm, the authors' settings", compare_sirllm, model, authors["sirllm"], same))
        rows.append(attempt("sirllm decay 1 (control)", compare_sirllm, model, authors["sirllm"], {**same, "decay": 1.0}))
        rows.append(attempt("sirllm score surprisal (control)", compare_sirllm, model, authors["sirllm"],
                            {**same, "score": "surprisal"}))
    print_table(rows)

    about = {
        name: {"commit": run.get("commit", "unknown"), "transformers": run["transformers"], "torch": run["torch"],
               "settings": run["settings"], "seconds": run["seconds"]}
        for name, run in authors.items()
    }
    if "longheads" in authors:
        about["longheads"].update(tokens=len(authors["longheads"]["input_ids"]), document=inputs["longheads"]["document"],
                                  greedy_tokens=authors["longheads"]["greedy_tokens"])
    if "sirllm" in authors:
        turns = authors["sirllm"]["turns"]
        about["sirllm"].update(turns=len(turns), evictions=sum(len(t["kept_positions"]) < t["cache_before"] for t in turns))
    lminf_tree = Path(lminf.__file__).resolve().parents[1]  # the lminf that ran, wherever it was imported from
    git = ["git", "-C", str(lminf_tree)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run([*git, "status", "--porcelain", "lminf"], capture_output=True, text=True).stdout.strip():
        commit += "+uncommitted"
    report = {
        "script": "checks/authors/compare.py", "commit": commit,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "load_average": os.getloadavg()},
        "lminf_transformers": __import__("transformers").__version__, "authors": about, "rows": rows,
    }
    if args.only and args.out.exists():  # one strategy rerun: keep the other's rows
        previous = json.loads(args.out.read_text())
        report["authors"] = {**previous["authors"], **report["authors"]}
        report["rows"] = [row for row in previous["rows"] if not row["name"].startswith(args.only)] + rows
        report["commit"] = {**_by_strategy(previous), args.only: commit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
