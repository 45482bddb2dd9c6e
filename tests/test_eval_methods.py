"""The evaluation methods' registry (every registered strategy reaches eval, bench and the
report with no edit in lminf.eval) and the one resumable run store every runner uses."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest
import torch

from lminf.eval import cli as eval_cli
from lminf.eval.methods import Patched, Vanilla, Window, check_distinct, method_names, methods_from, strategy_of
from lminf.eval.perplexity import run_ppl
from lminf.eval.report import ours_and_others, write_report
from lminf.eval.runs import RunStore
from lminf.strategies import STRATEGIES, LMInfinite, Sinks
from tests.helpers import tiny_model


def parse(*argv: str) -> argparse.Namespace:
    """Arguments as `lminf ...` parses them (data, eval, bench)."""
    parser = argparse.ArgumentParser()
    eval_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Drifting(Sinks):
    """A strategy the package has never seen: registered only for the test."""

    name = "drifting"
    presets = {"drifting": {}, "drifting-wide": {"n_global": 32}}


@pytest.fixture
def drifting(monkeypatch):
    monkeypatch.setitem(STRATEGIES, Drifting.name, Drifting)
    return Drifting


def test_every_registered_strategy_method_is_offered():
    offered = method_names()
    assert offered[0] == "vanilla" and offered[-1] == "window"
    assert set(offered[1:-1]) == {m for cls in STRATEGIES.values() for m in cls.methods()}
    assert {"lminf", "lminf-topk", "sinks"} <= set(offered)  # today's command-line names
    assert method_names(vanilla=False, window=False) == offered[1:-1]


def test_a_new_strategy_reaches_eval_bench_and_report_without_an_edit(drifting):
    args = parse("eval", "ppl", "--methods", "vanilla,drifting,drifting-wide", "--n-local", "64")
    vanilla, narrow, wide = methods_from(args.methods, args)
    assert isinstance(vanilla, Vanilla) and narrow.strategy == Drifting(n_global=10, n_local=64)
    assert wide.name == "drifting-wide" and wide.settings() == {"strategy": "drifting", "n_global": 32, "n_local": 64}
    stream = parse("eval", "stream", "--methods", "drifting")
    assert [m.name for m in methods_from(stream.methods, stream, eval_cli.choices("stream"))] == ["drifting"]
    bench = parse("bench", "--methods", "drifting-wide,vanilla")
    assert [m.name for m in methods_from(bench.methods, bench, eval_cli.choices("bench"))] == ["drifting-wide", "vanilla"]
    assert "drifting-wide" in eval_cli.choices("passkey") and "drifting" in parse("eval", "needle").methods.split(",")
    assert strategy_of("drifting-wide", wide.settings()) == "drifting"


def test_a_new_strategy_reaches_the_report(drifting, tmp_path):
    model, ids = tiny_model(), torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(0))
    methods = [Patched(LMInfinite(n_global=2, n_local=16)), Patched(Drifting(n_global=2, n_local=16)), Window(16)]
    run_ppl(model, {"doc": ids}, methods, bucket=32, out_json=tmp_path / "runs" / "ppl.json", progress=False)
    text = write_report(tmp_path / "runs", tmp_path / "docs" / "results.md").read_text()
    assert "| positions | lminf | drifting | window |" in text
    assert "drifting {'strategy': 'drifting', 'n_global': 2, 'n_local': 16}" in text
    assert "- NLL, doc: lminf is worse than drifting by more than 0.01 nats in" in text
    assert "- NLL, doc: lminf is worse than window by more than 0.01 nats in" in text
    assert "- doc: lminf minus the recomputed window past the training length" in text
    assert "up to its training length (64 tokens), so" in text  # from the JSON (no model named there)


def test_methods_take_the_settings_they_have_and_presets_fix_theirs():
    args = parse("eval", "passkey", "--n-global", "4", "--top-k", "3")
    methods = {m.name: m for m in methods_from(",".join(method_names()), args)}
    assert methods["lminf"].settings() == {"strategy": "lminf", "n_global": 4, "n_local": 1024, "top_k": 0, "top_k_from_layer": 4}
    assert methods["lminf-topk"].settings()["top_k"] == 3
    assert methods["sinks"].settings() == {"strategy": "sinks", "n_global": 4, "n_local": 1024}  # no top-k setting
    assert methods["window"] == Window(1024) and methods["vanilla"].settings() == {}


def test_unknown_method_names_the_choices():
    args = parse("eval", "ppl")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['lminf-top5'\]; choose from vanilla, lminf, lminf-topk, sinks"):
        methods_from("vanilla,lminf-top5", args)
    with pytest.raises(ValueError, match="choose from lminf, lminf-topk, sinks"):
        methods_from("window", args, eval_cli.choices("stream"))  # streaming: strategies only


def test_two_methods_with_the_same_settings_are_an_error():
    args = parse("eval", "ppl", "--top-k", "0")
    with pytest.raises(ValueError, match="method lminf-topk is the same as lminf"):  # alone too
        methods_from("lminf-topk", args)
    with pytest.raises(ValueError, match="methods a and b have identical settings"):
        check_distinct([Patched(LMInfinite(n_local=64), "a"), Patched(LMInfinite(n_local=64), "b")])
    with pytest.raises(ValueError, match="asked for twice"):
        methods_from("sinks,sinks", args)
    assert len(methods_from("lminf,sinks", args)) == 2  # same tokens, another strategy: distinct


def test_strategy_flag_does_not_apply_to_evaluations():
    for command in (("eval", "ppl"), ("bench",)):
        assert not hasattr(parse(*command), "strategy")
        with pytest.raises(SystemExit):  # --methods says what runs
            parse(*command, "--strategy", "sinks")


def test_report_finds_the_lm_infinite_methods_by_the_strategy_their_settings_name():
    run = {"results": {}, "methods": {"fast": {"strategy": "lminf"}, "sinks": {"strategy": "sinks"}, "window": {}}}
    assert ours_and_others(run, ["fast", "sinks", "window"]) == (["fast"], ["sinks", "window"])
    named_lminf = {"results": {}, "methods": {"lminf": {"strategy": "sinks"}, "other": {"strategy": "lminf"}}}
    assert ours_and_others(named_lminf, ["lminf", "other"]) == (["other"], ["lminf"])  # the settings say, not the name


def test_patched_takes_a_strategy_or_its_name():
    assert Patched("sinks") == Patched(Sinks(), "sinks")
    assert Patched(Sinks(n_local=8), "short").settings() == {"strategy": "sinks", "n_global": 10, "n_local": 8}


# -- the run store -------------------------------------------------------------------------


class Named:
    def __init__(self, name: str, **settings):
        self.name, self._settings = name, settings

    def settings(self) -> dict:
        return self._settings


def test_run_store_resumes_skipping_finished_cells(tmp_path):
    path, computed = tmp_path / "run.json", []

    def compute(key):
        computed.append(key)
        return {"value": key}

    store = RunStore(path, {"bucket": 8})
    for key in ("a", "b"):
        store.cell(key, lambda key=key: compute(key))
    again = RunStore(path, {"bucket": 8})
    for key in ("a", "b", "c"):
        again.cell(key, lambda key=key: compute(key))
    assert computed == ["a", "b", "c"]  # a and b come from the file
    assert json.loads(path.read_text())["results"] == {k: {"value": k} for k in "abc"}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    stale = RunStore(path, {"bucket": 8})
    stale.cell("a", lambda: compute("a2"), value="other")  # a finished cell with other fields is redone
    assert computed[-1] == "a2"


def test_run_store_refuses_another_run(tmp_path):
    path = tmp_path / "run.json"
    store = RunStore(path, {"task": "passkey", "seed": 0})
    store.put("x", {})
    with pytest.raises(ValueError, match=r"holds another run \(\{'task': 'passkey', 'seed': 0\}\); use another --out"):
        RunStore(path, {"task": "passkey", "seed": 1})
    with pytest.raises(ValueError, match="holds a run with bucket None; use another --out or the same bucket"):
        RunStore(path, {"bucket": 4}, "holds a run with bucket {bucket}; use another --out or the same bucket.")
    store.record_methods([Named("m", k=1)])
    store.save()
    again = RunStore(path, {"task": "passkey", "seed": 0})
    again.record_methods([Named("m", k=1), Named("n")])
    with pytest.raises(ValueError, match=r"holds a run of m with other settings \(\{'k': 1\}\)"):
        again.record_methods([Named("m", k=2)])
