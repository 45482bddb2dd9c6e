"""`lminf eval ppl`: methods against the vanilla model, bucketing, resuming, determinism, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from lminf.eval.perplexity import (
    Lminf,
    Sinks,
    Vanilla,
    Window,
    bucket_means,
    plot_ppl,
    plot_stream,
    run_ppl,
    run_stream,
    token_nll,
)
from tests.conftest import tiny_model

torch.set_grad_enabled(False)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_token_nll_is_cross_entropy_of_one_forward():
    model, ids = tiny_model(), tokens(50)
    logits = model(ids, use_cache=False).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    from transformers import DynamicCache

    torch.testing.assert_close(token_nll(model, ids, DynamicCache(), chunk_size=7, progress=False), want, rtol=1e-4, atol=1e-4)


def test_methods_equal_vanilla_inside_the_window():
    model, ids = tiny_model(), tokens(60)  # max_position_embeddings = 64
    vanilla = Vanilla().nll(model, ids, progress=False)
    for method in (Lminf(n_global=3), Window(stride=5)):
        torch.testing.assert_close(method.nll(model, ids, progress=False), vanilla, rtol=1e-4, atol=1e-4)
    assert "lminf" not in model.config._attn_implementation  # Lminf unpatches after itself


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


def test_run_resumes_is_deterministic_and_plots(tmp_path):
    model = tiny_model()
    docs = {"a.txt": tokens(70, 1), "b.txt": tokens(70, 2)}
    out = tmp_path / "ppl.json"
    first = run_ppl(model, docs, [Counting(), Lminf(n_global=2, n_local=16)], bucket=16, out_json=out, progress=False)
    assert Counting.calls == 2
    again = run_ppl(model, docs, [Counting(), Lminf(n_global=2, n_local=16)], bucket=16, out_json=out, progress=False)
    assert Counting.calls == 2  # nothing recomputed
    assert again["results"] == first["results"]
    fresh = run_ppl(model, docs, [Lminf(n_global=2, n_local=16)], bucket=16, out_json=tmp_path / "x.json", progress=False)
    for key, cell in fresh["results"].items():
        assert cell["bucket_nll"] == first["results"][key]["bucket_nll"]  # deterministic
    assert first["results"]["a.txt/lminf"]["bucket_tokens"] == [16, 16, 16, 16, 5]  # 69 predicted tokens
    with pytest.raises(ValueError, match="bucket"):
        run_ppl(model, docs, [Counting()], bucket=8, out_json=out, progress=False)
    png = tmp_path / "ppl.png"
    plot_ppl(json.loads(out.read_text()), png)
    assert matplotlib.image.imread(png).shape[0] > 100


def test_cli_eval_ppl_and_short_document(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 30)
    out = tmp_path / "run.json"
    cli = [sys.executable, "-m", "lminf.cli", "eval", "ppl", str(doc), "--bucket", "100", "--n-local", "64", "--out", str(out)]
    run = subprocess.run([*cli, "--tokens", "300"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"doc/vanilla", "doc/lminf", "doc/sinks", "doc/window"}
    assert out.with_suffix(".png").exists() and "| positions |" in run.stdout
    short = subprocess.run([*cli, "--tokens", "100000"], capture_output=True, text=True, timeout=600)
    assert short.returncode == 2 and "fewer than --tokens" in short.stderr


def test_sinks_differs_from_lminf_only_past_the_window():
    model, ids = tiny_model(), tokens(120)
    lminf_nll = Lminf(n_global=3, n_local=16).nll(model, ids, progress=False)
    sinks_nll = Sinks(n_global=3, n_local=16).nll(model, ids, progress=False)
    torch.testing.assert_close(sinks_nll[:16], lminf_nll[:16])  # every key still local
    assert not torch.allclose(sinks_nll[40:], lminf_nll[40:])  # global keys at other distances


def test_stream_equals_one_pass_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    model, ids = tiny_model(), tokens(150)
    method = Lminf(n_global=2, n_local=16)
    want = bucket_means(method.nll(model, ids, progress=False), 32)

    import lminf.eval.perplexity as evaluate

    real_nll, calls = evaluate._nll, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 12:  # partway through the third bucket (5 chunks a bucket)
            raise KeyboardInterrupt
        return real_nll(*args)

    out = tmp_path / "stream.json"
    monkeypatch.setattr(evaluate, "_nll", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False)
    monkeypatch.setattr(evaluate, "_nll", real_nll)
    assert len(json.loads(out.read_text())["results"]["lminf"]["buckets"]) == 2
    report = run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False)
    buckets = report["results"]["lminf"]["buckets"]
    assert [b["end"] for b in buckets] == [32, 64, 96, 128, 149]
    torch.testing.assert_close(torch.tensor([b["nll"] for b in buckets]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert len({b["cache_mib"] for b in buckets}) == 1  # the window was full from the first bucket on
    out.with_name("stream.lminf.ckpt").unlink()  # a finished run is kept from its JSON alone
    monkeypatch.setattr(evaluate, "_nll", None)  # nothing may be scored again
    assert run_stream(model, ids, method, bucket=32, out_json=out, chunk_size=7, progress=False) == report
    monkeypatch.setattr(evaluate, "_nll", real_nll)
    plot_stream(report, tmp_path / "stream.png")
    assert matplotlib.image.imread(tmp_path / "stream.png").shape[0] > 100


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
    report = subprocess.run([*cli, "report", "--runs", str(runs), "--out", str(tmp_path / "docs" / "results.md")], timeout=600)
    assert report.returncode == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "## Perplexity, one pass" in text and "## Streaming" in text and "| lminf | 700 |" in text
    assert (tmp_path / "docs" / "results" / "stream.png").exists() and (tmp_path / "docs" / "results" / "ppl.json").exists()
