"""`lminf eval leaderboard`: cells with values or reasons, resuming, the written table/plot/JSON, the generated advice."""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lminf.cli import main
from lminf.eval import cli as eval_cli
from lminf.eval import leaderboard
from lminf.eval.leaderboard import Column, advice, columns, default_plan, plot_leaderboard, run_leaderboard, write_outputs
from lminf.eval.methods import Patched, SegmentWise, Vanilla, Window, methods_from
from lminf.eval.ruler import Sources
from tests.helpers import tiny_model

BENCH = {"dtype": "float32", "device": "cpu", "chunk": 64, "decode_tokens": 2, "threads": None, "weights": "dense"}
TEXT = " ".join(f"Sentence {i} tells how the miller's cat crossed the yard and sat in the sun." for i in range(300))


@pytest.fixture(scope="module")
def board(default_tokenizer, tmp_path_factory):
    """One small run: a tiny model (training length 128, so NLL and passkey at 256 and 512 tokens)."""
    tokenizer = default_tokenizer
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plan = default_plan(model, ruler_lengths=(600,), ruler_tasks=("fwe",), cost_lengths=(256, 512))
    plan = replace(plan, depths=(0.5,), vanilla_up_to=512, bench=BENCH, isolate=False)
    plan = replace(plan, dialogue_cache=32, episodes=2, distractors=2)
    methods = [Vanilla(), Window(), Patched("sinks"), SegmentWise()]
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    sources = Sources.load(TEXT, "cat")
    out = tmp_path_factory.mktemp("runs") / "leaderboard.json"
    run = dict(model=model, tokenizer=tokenizer, methods=methods, plan=plan, text_ids=ids, sources=sources, out_json=out)
    report = run_leaderboard(**run, model_path=str(folder), progress=False)
    return report, run, str(folder)


def test_every_cell_has_a_value_or_a_reason(board):
    report, run, _ = board
    assert report["rows"] == ["vanilla", "window", "sinks", "xl3m"]
    assert [c.cell for c in columns(run["plan"])][:5] == ["nll/256", "nll/512", "passkey/256", "passkey/512", "ruler/fwe/600"]
    for method in report["rows"]:
        for column in columns(run["plan"]):
            cell = report["results"][f"{method}/{column.cell}"]
            assert ("values" in cell) != ("na" in cell), (method, column)
            assert "na" in cell or isinstance(cell["values"][column.metric], float)
            assert cell["machine"] and cell["finished"]
    na = {key: cell["na"] for key, cell in report["results"].items() if "na" in cell}
    assert set(na) == {"xl3m/nll/256", "xl3m/nll/512", "xl3m/cost/256", "xl3m/cost/512", "window/cost/256", "window/cost/512",
                       "vanilla/ruler/fwe/600", "window/dialogue/32", "xl3m/dialogue/32"}  # fmt: skip
    assert "no per-token NLL" in na["xl3m/nll/512"] and "no cache" in na["window/cost/256"]
    assert "not a dialogue" in na["window/dialogue/32"]
    sized = report["results"]["sinks/dialogue/32"]  # sinks at a 32-token cache, two episodes
    assert sized["settings"]["n_global"] + sized["settings"]["n_local"] == 32 and len(sized["episodes"]) == 2
    assert "--vanilla-up-to 512" in na["vanilla/ruler/fwe/600"]  # any cell longer, not only a cost cell
    assert report["results"]["vanilla/cost/256"]["values"]["device_kv_mib"] > 0


def test_nll_is_the_mean_over_the_last_half(board):
    """Against a float64 forward of the whole prompt: the mean NLL of the tokens at positions L/2 .. L-1."""
    report, run, _ = board
    model = run["model"].double()
    try:
        for n in (256, 512):
            ids = run["text_ids"][:, :n]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0], -1)
            nll = -logp[torch.arange(n - 1), ids[0, 1:]]  # nll[i]: the token at position i + 1
            expected = float(nll[n // 2 - 1 :].mean())
            cell = report["results"][f"vanilla/nll/{n}"]
            assert cell["positions"] == [n // 2, n - 1]
            assert cell["values"]["nll"] == pytest.approx(expected, abs=1e-4)
    finally:
        model.float()


def test_a_finished_cell_is_not_rerun(board, monkeypatch):
    report, run, folder = board
    before = json.loads(run["out_json"].read_text())
    calls = []

    def counted(name):
        real = getattr(leaderboard, name)
        monkeypatch.setattr(leaderboard, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    for name in ("nll_cell", "passkey_cell", "ruler_score", "cost_cell"):
        counted(name)
    again = run_leaderboard(**run, model_path=folder, progress=False)
    assert calls == [] and again["results"] == before["results"]
    # A lost cell, and a failed one (kept with its error), are the only ones computed again.
    stored = json.loads(run["out_json"].read_text())
    del stored["results"]["sinks/nll/512"]
    stored["results"]["sinks/cost/256"] = {"method": "sinks", "cell": "cost/256", "na": "failed: OOM", "error": True}
    run["out_json"].write_text(json.dumps(stored))
    again = run_leaderboard(**run, model_path=folder, progress=False)
    assert sorted(calls) == ["cost_cell", "nll_cell"]
    assert again["results"]["sinks/nll/512"]["values"] == before["results"]["sinks/nll/512"]["values"]
    assert "values" in again["results"]["sinks/cost/256"]
    with pytest.raises(ValueError, match="another leaderboard"):
        run_leaderboard(**{**run, "plan": replace(run["plan"], seed=1)}, model_path=folder, progress=False)


def test_cells_picks_the_kinds_run_now_and_remeasure_runs_finished_ones_again(board, tmp_path, monkeypatch):
    _, run, folder = board
    out = tmp_path / "leaderboard.json"
    calls = []
    real = leaderboard.cost_cell
    monkeypatch.setattr(leaderboard, "cost_cell", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    first = run_leaderboard(**{**run, "out_json": out}, model_path=folder, progress=False, kinds=("cost",))
    assert {cell["cell"].split("/")[0] for cell in first["results"].values()} == {"cost"}
    asked = ["vanilla", "vanilla", "window", "window", "sinks", "sinks", "xl3m", "xl3m"]  # at 256 and 512 tokens
    assert calls == asked  # window and xl3m are asked and answer n/a (no cache)
    before = json.loads(out.read_text())["results"]
    calls.clear()
    again = run_leaderboard(**{**run, "out_json": out}, model_path=folder, progress=False, kinds=("cost",), remeasure=("cost",))
    assert calls == asked and again["results"].keys() == before.keys()
    assert again["results"]["sinks/cost/256"]["finished"] >= before["sinks/cost/256"]["finished"]
    with pytest.raises(ValueError, match="unknown cell kind"):
        run_leaderboard(**{**run, "out_json": out}, model_path=folder, progress=False, kinds=("costs",))


def test_a_run_of_other_methods_adds_their_rows(board, tmp_path):
    """The slow rows run later into the same file: the earlier rows and cells stay, in ROWS' order."""
    _, run, folder = board
    out = tmp_path / "leaderboard.json"
    out.write_text(run["out_json"].read_text())
    before = json.loads(out.read_text())["results"]
    again = run_leaderboard(**{**run, "methods": [Patched("lminf")], "out_json": out}, model_path=folder, progress=False)
    assert again["rows"] == ["vanilla", "window", "sinks", "lminf", "xl3m"]
    assert all(again["results"][key] == cell for key, cell in before.items())
    assert "values" in again["results"]["lminf/nll/512"]


def test_the_table_plot_and_json_are_written(board):
    report, run, _ = board
    text, md, png = write_outputs(report, run["out_json"])
    assert md.read_text().strip() == text.strip() and png.stat().st_size > 0
    lines = text.splitlines()
    assert lines[0].startswith("| method | NLL 256 | NLL 512 | passkey % 256")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "method" not in line}
    assert set(rows) == {"vanilla", "window", "sinks", "xl3m"}
    assert rows["xl3m"].count("n/a") == 2 + 1 + 8  # two NLL cells, the dialogue cell and eight cost cells
    nll = report["results"]["sinks/nll/256"]["values"]["nll"]
    assert f"| sinks | {nll:.2f} |" in text
    assert "xl3m nll/256: xl3m picks segments" in text and "For the least device memory" in text
    saved = json.loads(run["out_json"].read_text())
    assert saved["plan"]["lengths"] == [256, 512] and saved["training_length"] == 128 and saved["columns"]


def test_pieces_run_by_two_workers_merge_into_one_reported_table(board, tmp_path):
    """Two workers run other methods into their own files; the merged file is the table the report shows."""
    _, run, folder = board
    a = tmp_path / "a.json"
    a.write_text(json.dumps(json.loads(run["out_json"].read_text()) | {"script": "lminf eval leaderboard --methods A"}))
    b = tmp_path / "b.json"
    piece = {**run, "methods": [Patched("lminf")], "out_json": b}
    run_leaderboard(**piece, model_path=folder, meta={"script": "lminf eval leaderboard --methods B"}, progress=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert main(["eval", "merge", str(a), str(b), "--out", str(runs / "leaderboard.json")]) == 0
    joined = json.loads((runs / "leaderboard.json").read_text())
    assert joined["rows"] == ["vanilla", "window", "sinks", "xl3m", "lminf"]
    out = main(["eval", "report", "--runs", str(runs), "--out", str(tmp_path / "results.md")])
    text = (tmp_path / "results.md").read_text()
    assert out == 0 and "## Leaderboard: which strategy to pick" in text and (tmp_path / "results" / "leaderboard.png").exists()
    nll = joined["results"]["lminf/nll/512"]["values"]["nll"]
    assert f"| lminf | {joined['results']['lminf/nll/256']['values']['nll']:.2f} | {nll:.2f} |" in text
    assert "`lminf eval leaderboard --methods A`" in text and "`lminf eval leaderboard --methods B`" in text


def test_provenance_names_this_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    found = leaderboard.provenance()
    assert found["commit"] == head and found["script"].startswith("lminf")


def fabricated() -> dict:
    """Rows a, b, c with one winner per rule (b recalls, c predicts, a decodes cheaply, b prefills, c is smallest)."""
    cols = [
        Column("nll/2", "nll", "NLL 2", "low"),
        Column("nll/4", "nll", "NLL 4", "low"),
        Column("passkey/2", "passkey", "passkey 2", "high"),
        Column("passkey/4", "passkey", "passkey 4", "high"),
        Column("cost/8", "decode_ms", "decode 8", "low"),
        Column("cost/8", "prefill_tok_s", "prefill 8", "high"),
        Column("cost/8", "device_kv_mib", "KV 8", "low"),
    ]
    values = {
        "a": {"nll/2": 1.0, "nll/4": 3.0, "passkey/2": 100.0, "passkey/4": 20.0,
              "cost/8": {"decode_ms": 5.0, "prefill_tok_s": 100.0, "device_kv_mib": 9.0}},
        "b": {"nll/2": 2.0, "nll/4": 2.5, "passkey/2": 0.0, "passkey/4": 80.0,
              "cost/8": {"decode_ms": 9.0, "prefill_tok_s": 900.0, "device_kv_mib": 5.0}},
        "c": {"nll/2": 3.0, "nll/4": 2.0, "passkey/4": 40.0,
              "cost/8": {"decode_ms": 7.0, "prefill_tok_s": 300.0, "device_kv_mib": 1.0}},
    }  # fmt: skip
    results = {}
    for method, cells in values.items():
        for cell, v in cells.items():
            metric = cell.split("/")[0]
            results[f"{method}/{cell}"] = {"values": v if isinstance(v, dict) else {metric: v}}
    results["c/passkey/2"] = {"na": "no reason"}
    return {"rows": list(values), "columns": [c.__dict__ for c in cols], "results": results, "nll_tokens": "..."}


def test_the_advice_names_the_winner_of_each_rule():
    text = advice(fabricated())
    assert "For recall far past the training length, use b (passkey 4: 80)." in text  # 4x, not 2x where a wins
    assert "For the best prediction of long text, use c (NLL 4: 2.00)." in text
    assert "For the cheapest decoding at long context, use a (decode 8: 5.00)." in text
    assert "For the fastest prefill of a long prompt, use b (prefill 8: 900)." in text
    assert "For the least device memory, use c (KV 8: 1.0)." in text
    tied = fabricated()
    tied["results"]["a/passkey/4"]["values"]["passkey"] = 80.0
    assert "recall far past the training length, use a and b (passkey 4: 80)" in advice(tied)
    for method in "abc":
        tied["results"][f"{method}/passkey/4"] = {"values": {"passkey": 0.0}}
    assert "For recall far past the training length, no method stands out (passkey 4)." in advice(tied)
    del tied["results"]["c/passkey/4"]  # a run not finished names no winner
    assert "For recall far past the training length, not every method has run yet (passkey 4: c)." in advice(tied)


def test_the_heatmap_normalises_each_column_and_writes_raw_values(tmp_path):
    report = fabricated()
    fig = plot_leaderboard(report, tmp_path / "h.png")
    grid = fig.axes[0].images[0].get_array()
    cols = [c["label"] for c in report["columns"]]
    nll4, passkey2, kv = cols.index("NLL 4"), cols.index("passkey 2"), cols.index("KV 8")
    assert [float(grid[i, nll4]) for i in range(3)] == [0.0, 0.5, 1.0]  # lower is better: c = 1
    assert [float(grid[i, kv]) for i in range(3)] == [0.0, 0.5, 1.0]
    assert float(grid[0, passkey2]) == 1.0 and float(grid[1, passkey2]) == 0.0 and grid.mask[2, passkey2]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[: len(cols)] == ["1.00", "3.00", "100", "20", "5.00", "100", "9.0"] and texts.count("n/a") == 1
    assert (tmp_path / "h.png").stat().st_size > 0


def test_the_command_offers_every_row_by_default():
    parser = argparse.ArgumentParser()
    eval_cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "leaderboard"])
    methods = methods_from(args.methods, args, eval_cli.choices("leaderboard"))
    every = ["vanilla", "window", "sinks", "lminf", "lminf-topk", "infllm", "longheads", "sirllm", "xl3m"]
    assert [m.name for m in methods] == every
    assert args.lengths is None and args.cost_lengths == "16384,32768"  # lengths: 2x and 4x the training length


def test_a_ruler_length_too_short_fails_before_any_cell(board, tmp_path):
    _, run, folder = board
    plan = replace(run["plan"], ruler_lengths=(100,))
    with pytest.raises(ValueError, match="too short|room|needs"):
        run_leaderboard(**{**run, "plan": plan, "out_json": tmp_path / "x.json"}, model_path=folder, progress=False)
    assert not (tmp_path / "x.json").exists()
