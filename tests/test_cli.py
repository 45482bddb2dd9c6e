"""`lminf generate` and `lminf bench` end to end on the default model; the bench's tables, plots and counts."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lminf
from lminf.arguments import add_model_args, kv_dtype_for, weights_for
from lminf.cli import main
from lminf.default_model import converted_folder
from lminf.eval.bench import prefill_pairs
from lminf.eval.methods import Patched, Vanilla
from lminf.eval.plots import plot_bench
from lminf.eval.tables import bench_page, bench_table, shown, write_section
from lminf.strategies import InfLLM, LMInfinite
from lminf.weights import int4
from tests.helpers import lminf_cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
@pytest.mark.model
def test_generate_streams_text_and_reports_stats(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    run = lminf_cli(
        "generate", str(doc), "-i", "Which animal jumps?", "--max-new-tokens", "6", "--n-local", "64", "--dtype", "float32"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    stats = run.stderr.strip().splitlines()[-1]
    assert stats.startswith("[lminf] prompt") and "tok/s" in stats and "peak memory" in stats


@pytest.mark.slow
@pytest.mark.model
def test_generate_reads_stdin_and_vanilla_says_what_lminf_says(monkeypatch, capsys, default_tokenizer):
    text = "Name three colours of the rainbow."

    def generate(*flags: str) -> tuple[str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        # Dense weights: the promise is about the attention (the default's bfloat16 cache is vanilla's float32 one).
        assert main(["generate", "-", "--max-new-tokens", "5", "--weights", "dense", *flags]) == 0
        out = capsys.readouterr()
        return out.out, out.err.strip().splitlines()[-1]

    (vanilla, stats), (patched, _) = generate("--vanilla"), generate()
    messages = [{"role": "user", "content": text}]
    prompt = default_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert stats.startswith(f"[lminf] prompt {len(prompt)} tokens, generated 5 tokens")  # the prompt read from stdin
    assert vanilla.strip() and vanilla == patched  # a prompt inside the window: Lambda attention is the dense one


def test_empty_input_is_a_clear_error():
    run = lminf_cli("generate", "-", stdin="   ")
    assert run.returncode == 2
    assert "input is empty" in run.stderr


@pytest.mark.slow
@pytest.mark.model
def test_bad_setting_is_a_clear_error(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    run = lminf_cli("generate", str(doc), "--n-local", "0")
    assert run.returncode == 2 and "n_local must be >= 1" in run.stderr


@pytest.mark.slow
@pytest.mark.model
def test_bench_writes_table_json_plot_and_page(tmp_path):
    out, doc = tmp_path / "bench.json", tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    write_section(doc, "serving", "## Serving\n\nthe serving benchmark's table")  # another tool's section of the page
    args = ["--lengths", "64,128", "--decode-tokens", "3", "--vanilla-up-to", "64", "--n-local", "32", "--threads", "1"]
    run = lminf_cli("bench", *args, "--out", str(out), "--doc", str(doc))
    assert run.returncode == 0, run.stderr
    cells = json.loads(out.read_text())["results"]
    assert set(cells) == {"vanilla/64", "lminf/64", "vanilla/128", "lminf/128"}
    assert "above --vanilla-up-to 64" in cells["vanilla/128"]["skipped"]  # reported, not dropped
    for key in ("vanilla/64", "lminf/64", "lminf/128"):
        assert cells[key]["prefill_s"] > 0 and cells[key]["decode_ms"] > 0 and cells[key]["peak_mib"] > 0
    assert cells["lminf/128"]["cache_mib"] < cells["vanilla/64"]["cache_mib"]  # bounded: 10 + 32 tokens vs 64 + 3
    assert "| 128 |" in run.stdout and "not run" in run.stdout
    assert doc.exists() and doc.with_suffix(".png").exists() and "benchmarks.png" in doc.read_text()
    assert "the serving benchmark's table" in doc.read_text()  # kept
    report = json.loads(out.read_text())
    assert report["rates"]["bandwidth_gb_s"] > 0 and report["rates"]["matmul_tflop_s"] > 0
    assert cells["lminf/128"]["decode_bytes"] < cells["vanilla/64"]["decode_bytes"]  # same weights, 42 cached tokens vs 65
    assert "floor" in run.stdout
    lambda_ = {"strategy": "lminf", "n_global": 10, "n_local": 32, "top_k": 0, "top_k_from_layer": 4}
    assert report["methods"] == {"vanilla": {}, "lminf": lambda_} and cells["lminf/64"]["settings"] == lambda_


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 80), n_global=st.integers(0, 6), n_local=st.integers(1, 30), layers=st.integers(1, 3))
def test_bench_counts_the_pairs_the_mask_keeps(length, n_global, n_local, layers):
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    d = i - j
    assert prefill_pairs(Vanilla(), length, layers) == layers * (d >= 0).sum()  # dense causal mask
    lambda_pairs = ((d >= 0) & ((d < n_local) | (j < n_global))).sum()
    assert prefill_pairs(Patched(LMInfinite(n_global, n_local)), length, layers) == layers * lambda_pairs


def fake_bench(methods: list[str]) -> dict:
    """A bench report as run_bench writes it, with made-up figures (the last method skipped at 2048)."""
    results = {}
    for length in (1024, 2048):
        for n, method in enumerate(methods):
            cell = {"method": method, "tokens": length}
            if method == methods[-1] and length == 2048:
                cell["skipped"] = "above --vanilla-up-to 1024"
            else:
                figures = {"prefill_s": length / 1000 + n, "decode_ms": 10.0 + n, "peak_mib": 900.0 + n, "cache_mib": 40.0 + n}
                cell.update(figures, decode_bytes=10**9 * (n + 1), prefill_flops=10**9 * length)
            results[f"{method}/{length}"] = cell
    rates = {"bandwidth_gb_s": 10.0, "matmul_tflop_s": 0.1}
    return {"settings": {}, "model": "m", "machine": "x", "methods": {m: {} for m in methods}, "results": results, "rates": rates}


def test_bench_table_and_plot_have_a_column_and_a_line_per_method(tmp_path):
    methods = ["lminf", "sinks", "another-strategy", "vanilla"]
    report = fake_bench(methods)
    table = bench_table(report)
    header = table.splitlines()[0]
    for label in ("prefill s", "decode ms/token", "peak MiB", "KV cache MiB"):
        assert [f"{label} {m}" in header for m in methods] == [True] * 4
    # Floors: 2048e9 FLOPs at 0.1 TFLOP/s; (n + 1) GB at 10 GB/s.
    assert "| 2048 | 2.0 (20.5) | 3.0 (20.5) | 4.0 (20.5) | not run | 10 (100) | 11 (200) | 12 (300) | not run |" in table
    fig = plot_bench(report, tmp_path / "bench.png")
    # One legend below the plots (inside, many methods hid the lines): each method, then the floors' style.
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [*methods, "dashed: its floor"]
    for ax, field in zip(fig.axes, ("prefill_s", "decode_ms", "peak_mib"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {*methods, *(f"{m} floor" for m in methods if field != "peak_mib")}
        for m in methods:
            cells = [c for c in report["results"].values() if c["method"] == m and field in c]
            assert list(lines[m].get_xdata()) == [c["tokens"] for c in cells]
            assert list(lines[m].get_ydata()) == [c[field] for c in cells]


def test_bench_json_from_before_the_registry_still_renders():
    report = json.loads((DOCS / "benchmarks.json").read_text())  # no "methods": the methods are read off the cells
    table = bench_table(report)
    assert table.splitlines()[0].startswith("| tokens | prefill s vanilla | prefill s lminf | decode ms/token vanilla |")
    assert "| 32768 | not run | 353.0 (300.1) |" in table


@pytest.mark.slow
@pytest.mark.model
def test_model_path_prints_the_converted_default_model():
    run = lminf_cli("model-path")
    assert run.returncode == 0, run.stderr
    folder = Path(run.stdout.strip())
    assert (folder / "config.json").exists() and folder == converted_folder()


def test_write_section_replaces_only_its_own(tmp_path):
    doc = tmp_path / "page.md"
    write_section(doc, "bench", "# Benchmarks\n\nold table")
    write_section(doc, "serving", "## Serving\n\nserving table")
    write_section(doc, "bench", "# Benchmarks\n\nnew table")
    text = doc.read_text()
    assert "new table" in text and "old table" not in text and "serving table" in text
    assert text.index("new table") < text.index("serving table")  # a section keeps its place


def test_a_bench_section_of_its_own_keeps_the_main_one(tmp_path):
    """`lminf bench --doc page --section NAME`: its own section and its own JSON/PNG copies' names."""
    doc = tmp_path / "benchmarks.md"
    write_section(doc, "bench", bench_page(fake_bench(["vanilla", "lminf"]), doc, "main table"))
    copies = doc.with_name("benchmarks-infllm.md")
    write_section(doc, "infllm", bench_page(fake_bench(["lminf", "infllm"]), doc, "side by side table", copies))
    text = doc.read_text()
    assert "main table" in text and "side by side table" in text and text.startswith("<!-- bench: generated")
    assert "## lminf, infllm side by side" in text and "`lminf bench --doc " in text and "--section infllm`" in text
    assert "(JSON: `benchmarks-infllm.json`)" in text and "(benchmarks-infllm.png)" in text


def test_a_generated_page_names_its_doc_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = bench_page(fake_bench(["vanilla", "lminf"]), tmp_path / "docs" / "benchmarks.md", "main table")
    assert "`lminf bench --doc docs/benchmarks.md`" in page and str(tmp_path) not in page
    assert shown(Path("/elsewhere/benchmarks.md")) == "/elsewhere/benchmarks.md"  # outside it: as given


@pytest.mark.slow
@pytest.mark.model
def test_generate_with_a_float16_cache_stores_float16_and_says_what_float32_says(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The capital of France is Paris. The capital of Italy is Rome. " * 20)
    caches, make_cache = [], lminf.make_cache
    monkeypatch.setattr(lminf, "make_cache", lambda model: caches.append(make_cache(model)) or caches[-1])

    def generate(*flags: str) -> str:
        args = ["generate", str(doc), "-i", "What is the capital of Italy?", "--max-new-tokens", "8", "--weights", "dense"]
        assert main([*args, "--n-local", "64", *flags]) == 0
        return capsys.readouterr().out

    float16 = generate("--kv-dtype", "float16")
    layer = caches[-1].layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.float16
    float32 = generate()
    assert caches[-1].layers[0].keys.dtype == torch.float32
    assert float16.strip() and float16 == float32  # 10 mantissa bits: the same greedy words on a short reply


def decoding_args(*flags: str, auto_weights: bool = True) -> argparse.Namespace:
    """The arguments of a decoding command (generate, chat, serve), or of eval/bench with auto_weights=False."""
    parser = argparse.ArgumentParser()
    add_model_args(parser, auto_weights=auto_weights)
    return parser.parse_args(["--device", "cpu", *flags])


def chosen(*flags: str, strategy: lminf.Strategy | None = None) -> tuple[str, torch.dtype | None]:
    """(weights, cache dtype or None: the model's) that a decoding command with these flags runs."""
    args = decoding_args(*flags)
    weights = weights_for(args)
    return weights, kv_dtype_for(args, weights, strategy or LMInfinite(n_local=64))


def test_built_in_models_decode_their_own_gguf_blocks_on_cpu_by_default():
    assert chosen() == ("gguf", torch.bfloat16)  # the default model, float32 activations on CPU
    assert chosen("--model", "gemma3-270m") == chosen("--dtype", "float32") == chosen("--vanilla") == ("gguf", torch.bfloat16)
    assert chosen("--kv-dtype", "float16") == ("gguf", torch.float16)  # a given cache dtype wins
    assert chosen(strategy=InfLLM(n_local=64)) == ("gguf", None)  # its cache keeps the model's dtype


def test_elsewhere_the_default_is_dense_and_given_flags_win(tmp_path, monkeypatch):
    assert chosen("--model", str(tmp_path)) == ("dense", None)  # a local model has no GGUF file of its own
    assert chosen("--dtype", "bfloat16") == chosen("--device", "cuda", "--dtype", "float32") == ("dense", None)
    assert chosen("--weights", "dense") == ("dense", None)  # float32, one flag away
    assert chosen("--weights", "gguf") == ("gguf", None)  # as asked: the cache as the model computes it
    assert chosen("--weights", "dense", "--kv-dtype", "bfloat16") == ("dense", torch.bfloat16)
    monkeypatch.setattr(int4, "_MM", None)  # a torch without the int4 CPU kernel: dense, no error
    assert chosen() == ("dense", None)


def test_eval_and_bench_keep_dense_weights():
    assert weights_for(decoding_args(auto_weights=False)) == "dense"
    with pytest.raises(SystemExit):
        decoding_args("--weights", "auto", auto_weights=False)
    with pytest.raises(SystemExit):
        main(["bench", "--weights", "auto"])


@pytest.mark.slow
@pytest.mark.model
def test_generate_with_no_flag_runs_the_gguf_weights_and_says_so():
    run = lminf_cli("generate", "-", "-i", "Name a colour.", "--max-new-tokens", "4", stdin="The sky is blue.")
    assert run.returncode == 0, run.stderr
    stats = run.stderr.strip().splitlines()[-1]
    assert stats.startswith("[lminf] prompt") and stats.endswith("weights gguf, kv bfloat16"), stats
    dense = lminf_cli("generate", "-", "-i", "Name a colour.", "--max-new-tokens", "4", "--weights", "dense", stdin="x")
    assert dense.stderr.strip().splitlines()[-1].endswith("weights dense float32, kv float32"), dense.stderr
