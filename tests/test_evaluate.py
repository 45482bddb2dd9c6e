"""`lminf eval ppl` / `stream`: methods against the vanilla model, bucketing, resuming, determinism, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

import lminf
from lminf.eval import perplexity
from lminf.eval.methods import Patched, Vanilla, Window
from lminf.eval.perplexity import bucket_means, run_ppl, run_stream
from lminf.eval.plots import plot_ppl, plot_stream
from lminf.generation import token_nll
from lminf.strategies import LMInfinite, Sinks
from tests.helpers import tiny_model, tokens
from tests.strategy_cases import CASES

torch.set_grad_enabled(False)


# Gemma 2 soft-caps its output logits; GPT-NeoX, GPT-J and MPT name their decoder and head differently.
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "gptj", "mpt"])
def test_token_nll_is_cross_entropy_of_one_forward(family):
    model, ids = tiny_model(family), tokens(50)
    logits = model(ids, use_cache=False).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids, DynamicCache(), chunk_size=7, progress=False), want, rtol=1e-4, atol=1e-4)


def test_methods_equal_vanilla_inside_the_window():
    model, ids = tiny_model(), tokens(60)  # max_position_embeddings = 64
    vanilla = Vanilla().nll(model, ids, progress=False)
    for method in (Patched(LMInfinite(n_global=3)), Patched("sinks"), Window(stride=5)):
        torch.testing.assert_close(method.nll(model, ids, progress=False), vanilla, rtol=1e-4, atol=1e-4)
    assert "lminf" not in model.config._attn_implementation  # Patched unpatches after itself


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_scores_what_the_patched_model_computes_in_one_forward(case):
    """For every registered strategy: the cached, chunked NLL of Patched is the patched model's full forward."""
    if not CASES[case].same_across_calls:
        pytest.skip("its output depends on the split into calls by design; tests/test_strategies.py checks it call by call")
    model, ids = tiny_model(), tokens(100)
    method = Patched(CASES[case])
    got = method.nll(model, ids, progress=False)
    with method.patched(model):
        logits = model(ids, use_cache=False).logits[0, :-1]
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"), rtol=1e-4, atol=1e-4)
    assert getattr(model, "_lminf", None) is None


def test_window_scores_each_token_from_its_recent_tokens_only():
    model, ids = tiny_model(), tokens(40)
    got = Window(n_local=8, stride=3).nll(model, ids, progress=False)
    for t in (5, 17, 39):  # target t, its block of 3 starting at a: context is ids[max(0, b - 8) : t]
        a = 1 + (t - 1) // 3 * 3
        b = min(a + 3, 40)
        start = max(0, b - 8)
        logits = model(ids[:, start:t], use_cache=False).logits[0, -1]
        want = torch.nn.functional.cross_entropy(logits[None], ids[0, t : t + 1])
        torch.testing.assert_close(got[t - 1], want, rtol=1e-4, atol=1e-4)


def test_bucketing():
    nll = torch.arange(10, dtype=torch.float32)
    assert bucket_means(nll, 4) == [1.5, 5.5, 8.5]


class Counting(Vanilla):
    name = "counting"
    calls = 0

    def nll(self, model, ids, progress=True):
        Counting.calls += 1
        return super().nll(model, ids, progress)


def check_ppl_plot(fig, report: dict) -> None:
    """Each document's panel holds one line per method with the JSON's bucket NLL, and the training length."""
    documents = sorted({c["document"] for c in report["results"].values()})
    assert [ax.get_title() for ax in fig.axes] == documents
    for ax, doc in zip(fig.axes, documents, strict=True):
        cells = [c for c in report["results"].values() if c["document"] == doc]
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [c["method"] for c in cells] + ["training length"]
        for line, cell in zip(lines, cells, strict=False):
            assert list(line.get_ydata()) == cell["bucket_nll"]
            assert list(line.get_xdata()) == [(k + 0.5) * report["bucket"] for k in range(len(cell["bucket_nll"]))]
        assert list(lines[-1].get_xdata()) == [report["training_length"]] * 2


def test_run_resumes_is_deterministic_and_plots(tmp_path):
    model = tiny_model()
    docs = {"a.txt": tokens(70, seed=1), "b.txt": tokens(70, seed=2)}
    out = tmp_path / "ppl.json"
    lambda_ = Patched(LMInfinite(n_global=2, n_local=16))
    Counting.calls = 0
    first = run_ppl(model, docs, [Counting(), lambda_], bucket=16, out_json=out, progress=False)
    assert Counting.calls == 2
    again = run_ppl(model, docs, [Counting(), lambda_], bucket=16, out_json=out, progress=False)
    assert Counting.calls == 2  # nothing recomputed
    assert again["results"] == first["results"]
    fresh = run_ppl(model, docs, [lambda_], bucket=16, out_json=tmp_path / "x.json", progress=False)
    for key, cell in fresh["results"].items():
        assert cell["bucket_nll"] == first["results"][key]["bucket_nll"]  # deterministic
    assert first["results"]["a.txt/lminf"]["bucket_tokens"] == [16, 16, 16, 16, 5]  # 69 predicted tokens
    with pytest.raises(ValueError, match="holds a run with bucket 16"):
        run_ppl(model, docs, [Counting()], bucket=8, out_json=out, progress=False)
    with pytest.raises(ValueError, match="holds a run of lminf with other settings"):
        run_ppl(model, docs, [Patched(LMInfinite(n_global=3, n_local=16))], bucket=16, out_json=out, progress=False)
    report = json.loads(out.read_text())
    check_ppl_plot(plot_ppl(report, tmp_path / "ppl.png"), report)
    assert (tmp_path / "ppl.png").stat().st_size > 0


def test_sinks_differs_from_lminf_only_past_the_window_and_says_so_in_the_json(tmp_path):
    model, ids = tiny_model(), tokens(120)
    methods = [Patched(LMInfinite(n_global=3, n_local=16)), Patched(Sinks(n_global=3, n_local=16))]
    report = run_ppl(model, {"doc": ids}, methods, bucket=16, out_json=tmp_path / "ppl.json", progress=False)
    lminf_nll, sinks_nll = (m.nll(model, ids, progress=False) for m in methods)
    torch.testing.assert_close(sinks_nll[:16], lminf_nll[:16])  # every key still local
    assert not torch.allclose(sinks_nll[40:], lminf_nll[40:])  # global keys at other distances
    cells = report["results"]
    assert cells["doc/lminf"]["bucket_nll"][0] == cells["doc/sinks"]["bucket_nll"][0]
    lambda_settings = {"strategy": "lminf", "n_global": 3, "n_local": 16, "top_k": 0, "top_k_from_layer": 4}
    assert cells["doc/lminf"]["settings"] == lambda_settings
    assert cells["doc/sinks"]["settings"] == {"strategy": "sinks", "n_global": 3, "n_local": 16}
    assert report["methods"]["sinks"] == cells["doc/sinks"]["settings"]


def test_settings_are_recorded_resolved_for_the_model(tmp_path):
    model = tiny_model()  # max_position_embeddings = 64
    methods = [Patched(Sinks(n_global=2)), Window()]
    report = run_ppl(model, {"doc": tokens(30)}, methods, bucket=16, out_json=tmp_path / "ppl.json", progress=False)
    sinks, window = {"strategy": "sinks", "n_global": 2, "n_local": 64}, {"n_local": 64, "stride": 16}
    assert report["methods"] == {"sinks": sinks, "window": window}


def check_stream_plot(fig, report: dict) -> None:
    top, bottom = fig.axes
    cells = list(report["results"].values())
    assert [line.get_label() for line in top.get_lines()] == [c["method"] for c in cells]
    labels = [line.get_label() for line in bottom.get_lines()]
    assert labels == [label for c in cells for label in (f"{c['method']} process RSS", f"{c['method']} KV cache")]
    for line, cell in zip(top.get_lines(), cells, strict=True):
        assert list(line.get_xdata()) == [b["end"] for b in cell["buckets"]]
        assert list(line.get_ydata()) == [b["nll"] for b in cell["buckets"]]
    for n, cell in enumerate(cells):
        rss, cache = bottom.get_lines()[2 * n : 2 * n + 2]
        assert list(rss.get_ydata()) == [b["rss_mib"] for b in cell["buckets"]]
        assert list(cache.get_ydata()) == [b["cache_mib"] for b in cell["buckets"]]


def test_stream_equals_one_pass_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    model, ids = tiny_model(), tokens(150)
    method = Patched(LMInfinite(n_global=2, n_local=16))
    want = bucket_means(method.nll(model, ids, progress=False), 32)

    real_nll, calls = perplexity.target_nll, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 12:  # partway through the third bucket (5 chunks a bucket)
            raise KeyboardInterrupt
        return real_nll(*args)

    out = tmp_path / "stream.json"
    monkeypatch.setattr(perplexity, "target_nll", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False)
    assert len(json.loads(out.read_text())["results"]["lminf"]["buckets"]) == 2
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    calls.clear()
    monkeypatch.setattr(perplexity, "target_nll", lambda *args: calls.append(1) or real_nll(*args))
    report = run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False)
    assert len(calls) == 5 + 5 + 3  # resumed at token 64 from the checkpoint: buckets 3, 4 and the last 21 tokens
    monkeypatch.setattr(perplexity, "target_nll", real_nll)
    buckets = report["results"]["lminf"]["buckets"]
    assert [b["end"] for b in buckets] == [32, 64, 96, 128, 149]
    torch.testing.assert_close(torch.tensor([b["nll"] for b in buckets]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert len({b["cache_mib"] for b in buckets}) == 1  # the window was full from the first bucket on
    out.with_name("stream.lminf.ckpt").unlink()  # a finished run is kept from its JSON alone
    monkeypatch.setattr(perplexity, "target_nll", None)  # nothing may be scored again
    assert run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False) == report
    monkeypatch.setattr(perplexity, "target_nll", real_nll)
    with pytest.raises(ValueError, match="holds a lminf run with another bucket"):
        run_stream(model, ids, method, bucket=16, out_json=out, chunk_size=7, progress=False)
    sinks = run_stream(model, ids, Patched(Sinks(n_global=2, n_local=16)), bucket=32, out_json=out, chunk_size=7, progress=False)
    assert set(sinks["results"]) == {"lminf", "sinks"}
    check_stream_plot(plot_stream(sinks, tmp_path / "stream.png"), sinks)


def test_stream_runs_every_registered_strategy(tmp_path):
    model, ids, out = tiny_model(), tokens(80), tmp_path / "new" / "stream.json"  # its folder made as needed
    for name, strategy in CASES.items():
        method = Patched(strategy, name)
        report = run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=16, progress=False)
        with method.patched(model):  # the same chunks of 16: a strategy may depend on them (lminf-original)
            want = bucket_means(token_nll(model, ids, method.new_cache(model), chunk_size=16, progress=False), 32)
        got = [b["nll"] for b in report["results"][name]["buckets"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert set(report["results"]) == set(CASES)
    assert {settings["strategy"] for settings in report["methods"].values()} == set(lminf.STRATEGIES)  # none left out


@pytest.mark.slow
@pytest.mark.model
def test_cli_eval_ppl_and_short_document(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 30)
    out = tmp_path / "run.json"
    cli = [sys.executable, "-m", "lminf.cli", "eval", "ppl", str(doc), "--bucket", "100", "--n-local", "64", "--out", str(out)]
    run = subprocess.run([*cli, "--tokens", "300"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"doc/vanilla", "doc/lminf", "doc/sinks", "doc/window"}
    assert report["methods"]["sinks"] == {"strategy": "sinks", "n_global": 10, "n_local": 64}
    assert out.with_suffix(".png").exists() and "| positions |" in run.stdout
    short = subprocess.run([*cli, "--tokens", "100000"], capture_output=True, text=True, timeout=600)
    assert short.returncode == 2 and "fewer than --tokens" in short.stderr


@pytest.mark.slow
@pytest.mark.model
def test_cli_eval_stream_and_report(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 30)
    runs = tmp_path / "runs"
    cli = [sys.executable, "-m", "lminf.cli", "eval"]
    stream = [*cli, "stream", str(doc), str(doc), "--tokens", "700", "--bucket", "256", "--n-local", "64"]
    run = subprocess.run([*stream, "--out", str(runs / "stream.json")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    cells = json.loads((runs / "stream.json").read_text())["results"]
    assert set(cells) == {"lminf", "sinks"} and cells["sinks"]["tokens"] == 700
    ppl = [*cli, "ppl", str(doc), "--tokens", "300", "--bucket", "100", "--n-local", "64", "--methods", "lminf,window"]
    assert subprocess.run([*ppl, "--out", str(runs / "ppl.json")], capture_output=True, timeout=600).returncode == 0
    other = json.loads((runs / "ppl.json").read_text()) | {"model": "other-model", "model_about": "its weights, described"}
    (runs / "ppl-other.json").write_text(json.dumps(other))  # a second model's run: a section of its own
    report = subprocess.run([*cli, "report", "--runs", str(runs), "--out", str(tmp_path / "docs" / "results.md")], timeout=600)
    assert report.returncode == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "## Perplexity, one pass" in text and "## Streaming" in text and "| lminf | 700 |" in text
    assert "- lminf minus sinks over their 3 common buckets" in text
    assert "## Perplexity, one pass (other), other-model" in text and "The model: its weights, described." in text
    assert (tmp_path / "docs" / "results" / "ppl-other.png").exists()
    assert (tmp_path / "docs" / "results" / "stream.png").exists() and (tmp_path / "docs" / "results" / "ppl.json").exists()


def test_a_run_of_the_main_model_is_held_against_the_main_runs_lminf():
    from lminf.eval.report import _against_main_run

    def run(method, nll):
        cells = {f"doc/{method}": {"document": "doc", "method": method, "bucket_nll": nll}}
        return {"model": "m", "training_length": 200, "bucket": 100, "results": cells}

    main, other = run("lminf", [3.0, 3.0, 4.0, 2.0]), run("infllm", [3.0, 3.0, 3.3, 2.1])
    lines = _against_main_run(other, main)
    assert lines[-1].startswith("- doc: infllm 2.700 vs lminf 3.000 of the main run (-10.00%), mean NLL past the training")
    assert _against_main_run({**other, "model": "another"}, main) == []  # another model: nothing to hold it against


def test_a_low_bit_run_is_held_against_the_same_method_of_the_main_run():
    from lminf.eval.report import _against_main_run

    def cell(method, nll, **settings):
        return {"document": "doc", "method": method, "bucket_nll": nll, "settings": settings}

    main = {"model": "m", "training_length": 200, "bucket": 100, "results": {}}
    main["results"] = {"a": cell("vanilla", [3.0, 3.0, 8.0]), "b": cell("lminf", [3.0, 3.0, 4.0])}
    low = {**main, "weights": "gguf", "results": {"a": cell("vanilla", [3.0, 3.0, 8.8]), "b": cell("lminf", [3.0, 3.0, 4.2])}}
    assert _against_main_run(low, main)[-2:] == [
        "- doc: vanilla (weights gguf) 8.800 vs vanilla 8.000 of the main run (+10.00%), mean NLL past the training length, "
        "the same tokens.",
        "- doc: lminf (weights gguf) 4.200 vs lminf 4.000 of the main run (+5.00%), mean NLL past the training length, "
        "the same tokens.",
    ]
    kv16 = {**main, "results": {"b": cell("lminf", [3.0, 3.0, 4.4], kv_dtype="bfloat16")}}
    assert _against_main_run(kv16, main)[-1].startswith("- doc: lminf (kv bfloat16) 4.400 vs lminf 4.000 of the main run (+10.0")
