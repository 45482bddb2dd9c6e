"""`lminf eval merge`: two workers' JSON runs of one evaluation join into their union; a conflict is refused."""

from __future__ import annotations

import json

from lminf.cli import main
from lminf.eval.runs import merge_runs


def run(methods: dict, results: dict) -> dict:
    return {"settings": {"lengths": [64]}, "model": "m", "machine": "x", "methods": methods, "results": results}


def write(path, report: dict):
    path.write_text(json.dumps(report))
    return str(path)


def test_merge_joins_two_runs_into_their_union(tmp_path, capsys):
    a = write(tmp_path / "a.json", run({"lminf": {"n_local": 8}}, {"lminf/64": {"nll": 1.0}}))
    b = write(tmp_path / "b.json", run({"sinks": {"n_local": 8}}, {"sinks/64": {"nll": 2.0}, "lminf/64": {"nll": 1.0}}))
    out = tmp_path / "joined.json"
    assert main(["eval", "merge", a, b, "--out", str(out), "--about", "two workers"]) == 0
    joined = json.loads(out.read_text())
    assert joined["methods"] == {"lminf": {"n_local": 8}, "sinks": {"n_local": 8}}
    assert joined["results"] == {"lminf/64": {"nll": 1.0}, "sinks/64": {"nll": 2.0}}
    assert joined["settings"] == {"lengths": [64]} and joined["about"] == "two workers"
    assert "2 cells of lminf, sinks" in capsys.readouterr().err


def test_merge_refuses_a_cell_two_runs_hold_differently(tmp_path, capsys):
    a = write(tmp_path / "a.json", run({"lminf": {}}, {"lminf/64": {"nll": 1.0}}))
    b = write(tmp_path / "b.json", run({"lminf": {}}, {"lminf/64": {"nll": 1.5}}))
    out = tmp_path / "joined.json"
    assert main(["eval", "merge", a, b, "--out", str(out)]) == 2
    assert "both hold cell lminf/64, with different contents" in capsys.readouterr().err and not out.exists()


def test_merge_refuses_runs_of_different_settings_or_method_settings(tmp_path, capsys):
    a = write(tmp_path / "a.json", run({"lminf": {"n_local": 8}}, {}))
    other = run({"lminf": {"n_local": 8}}, {}) | {"settings": {"lengths": [128]}}
    b = write(tmp_path / "b.json", other)
    assert main(["eval", "merge", a, b, "--out", str(tmp_path / "x.json")]) == 2
    assert "differ in settings" in capsys.readouterr().err
    c = write(tmp_path / "c.json", run({"lminf": {"n_local": 16}}, {}))
    assert main(["eval", "merge", a, c, "--out", str(tmp_path / "x.json")]) == 2
    assert "both hold method lminf, with different contents" in capsys.readouterr().err


def test_merge_joins_pieces_started_with_other_methods_and_lists_each_start(tmp_path):
    """Leaderboard pieces: each worker's command line, commit and rows differ; all are kept."""
    a = run({"window": {}}, {"window/64": {"nll": 1.0}}) | {"script": "lminf eval leaderboard --methods window",
                                                           "commit": "c1", "rows": ["vanilla", "window"]}  # fmt: skip
    b = run({"infllm": {}}, {"infllm/64": {"nll": 2.0}}) | {"script": "lminf eval leaderboard --methods infllm",
                                                           "commit": "c2", "rows": ["infllm"]}  # fmt: skip
    paths = [write(tmp_path / "a.json", a), write(tmp_path / "b.json", b)]
    out = tmp_path / "joined.json"
    joined = merge_runs(paths, out)
    assert joined["rows"] == ["vanilla", "window", "infllm"]
    assert joined["pieces"] == [{"script": a["script"], "commit": "c1"}, {"script": b["script"], "commit": "c2"}]
    assert merge_runs([out, *paths], out) == joined  # merging again as the workers go on adds nothing
