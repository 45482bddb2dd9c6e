"""`lminf generate` end to end on the default model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lminf.eval.bench import keys_per_prompt
from lminf.patching import LambdaSettings


def lminf_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lminf.cli", *args], input=stdin, capture_output=True, text=True, timeout=600)


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


def test_generate_reads_stdin_and_vanilla_runs():
    run = lminf_cli("generate", "-", "--vanilla", "--max-new-tokens", "3", "--dtype", "float32", stdin="Hello there.")
    assert run.returncode == 0, run.stderr


def test_empty_input_is_a_clear_error():
    run = lminf_cli("generate", "-", stdin="   ")
    assert run.returncode == 2
    assert "input is empty" in run.stderr


def test_bad_setting_is_a_clear_error(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    run = lminf_cli("generate", str(doc), "--n-local", "0")
    assert run.returncode == 2 and "n_local must be >= 1" in run.stderr


def test_bench_writes_table_json_plot_and_page(tmp_path):
    out, doc = tmp_path / "bench.json", tmp_path / "docs" / "benchmarks.md"
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
    report = json.loads(out.read_text())
    assert report["rates"]["bandwidth_gb_s"] > 0 and report["rates"]["matmul_tflop_s"] > 0
    assert cells["lminf/128"]["decode_bytes"] < cells["vanilla/64"]["decode_bytes"]  # same weights, 42 cached tokens vs 65
    assert "floor" in run.stdout


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 80), n_global=st.integers(0, 6), n_local=st.integers(1, 30))
def test_bench_counts_the_pairs_the_mask_keeps(length, n_global, n_local):
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    d = i - j
    lambda_pairs = ((d >= 0) & ((d < n_local) | (j < n_global))).sum()
    assert keys_per_prompt(length, LambdaSettings(n_global, n_local, 0, 0)) == lambda_pairs
    assert keys_per_prompt(length) == (d >= 0).sum()
