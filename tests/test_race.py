"""`lminf bench --race` (lminf.eval.race): the cells, the table, the refusals. llama.cpp itself is
never a test dependency: where llama-cpp-python is missing its cells record why."""

from __future__ import annotations

import _pydecimal
import json
import multiprocessing
import os
import signal
import sys

import pytest

from lminf.cli import main
from lminf.eval import cli as eval_cli
from lminf.eval import race
from lminf.eval.bench import _in_child, bandwidth_said
from lminf.eval.race import (
    ENGINES,
    LLAMA_CPP,
    LLAMA_CPP_PAST_TRAINING,
    _race_cell,
    llama_cpp_cell,
    medians,
    prompt_ids,
    race_table,
)
from tests.conftest import HAS_CXX
from tests.helpers import lminf_cli


def test_the_prompt_is_the_start_of_pydecimal_repeated():
    from transformers import AutoTokenizer

    import lminf

    tokenizer = AutoTokenizer.from_pretrained(lminf.default_model.model_source(None))
    ids = prompt_ids(tokenizer, 100_000)  # longer than the file: repeated
    whole = tokenizer(open(_pydecimal.__file__).read(), add_special_tokens=False).input_ids
    assert (
        len(ids) == 100_001 and ids[: len(whole)] == whole and ids[len(whole) : 2 * len(whole)] == whole[: 100_001 - len(whole)]
    )


def test_llama_cpp_is_not_run_past_the_training_length():
    cell = _race_cell(None, LLAMA_CPP, None, None, [], 8192, {"decode_tokens": 64}, 8192, False)
    assert cell == {"method": LLAMA_CPP, "tokens": 8192, "round": 0, "skipped": LLAMA_CPP_PAST_TRAINING}


def test_a_missing_llama_cpp_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'lminf\[race\]'"):
        llama_cpp_cell(None, [1, 2], 1, {"threads": 1, "decode_tokens": 1, "chunk": 8})


def test_race_table_has_a_row_per_cell_and_the_ratios():
    cell = {"prefill_s": 2.0, "peak_mib": 500.0}
    report = {
        "rates": {"bandwidth_gb_s": 10.0, "matmul_tflop_s": 0.1},
        "results": {
            "llama.cpp/1024": {"method": LLAMA_CPP, "tokens": 1024, "decode_ms": 10.0, **cell},
            "lminf-gguf/1024": {"method": "lminf-gguf", "tokens": 1024, "decode_ms": 15.0, "cache_mib": 30.0, **cell}
            | {"prefill_s": 1.0, "decode_bytes": 10**8, "prefill_flops": 10**9},
            "llama.cpp/16384": {"method": LLAMA_CPP, "tokens": 16384, "skipped": LLAMA_CPP_PAST_TRAINING},
            "lminf-gguf/16384": {"method": "lminf-gguf", "tokens": 16384, "decode_ms": 20.0, "cache_mib": 360.0, **cell}
            | {"decode_bytes": 10**8, "prefill_flops": 10**9},
        },
    }
    table = race_table(report)
    assert "| lminf-gguf | 1,024 | 1024 | 15.0 (10.0) | 500 | 30 |" in table  # floor: 1e8 bytes at 10 GB/s
    assert "| lminf-gguf | 1,024 | 1.50x | 2.00x | 1.50x |" in table  # decode 15 / 10, prefill 2 s / 1 s, 15 / 10 ms floor
    assert "| lminf-gguf | 16,384 | - | - | 2.00x |" in table  # llama.cpp did not run there
    assert "| llama.cpp | 16,384 | not run | | | |" in table and f"- llama.cpp at 16,384: {LLAMA_CPP_PAST_TRAINING}." in table


def _dies() -> dict:  # a cell whose process ends in native code, without a word (as llama.cpp on SIGILL)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_cell_whose_process_dies_says_so_instead_of_waiting_forever():
    context = multiprocessing.get_context("spawn")
    assert _in_child(context, _dies) == {"error": "the cell's process died (signal SIGKILL) without a result"}
    assert _in_child(context, len, [1, 2]) == 2  # a result put just before the process ends is kept


def test_rounds_give_medians_ratios_within_a_round_and_each_cells_own_floor(tmp_path):
    """Three rounds: the table shows medians with their ranges; a ratio to llama.cpp pairs cells of
    one round (a slow round slows both); each cell's floor uses the bandwidth it read itself."""
    results = {}
    for r, (rival, ours, gb_s) in enumerate([(10.0, 12.0, 10.0), (20.0, 22.0, 5.0), (11.0, 16.5, 20.0)]):
        suffix = f"/{r}" if r else ""
        results[f"llama.cpp/1024{suffix}"] = {"method": LLAMA_CPP, "tokens": 1024, "round": r, "decode_ms": rival}
        results[f"llama.cpp/1024{suffix}"] |= {"prefill_s": 1.0, "peak_mib": 400.0}
        results[f"lminf/1024{suffix}"] = {"method": "lminf", "tokens": 1024, "round": r, "decode_ms": ours, "read_gb_s": gb_s}
        results[f"lminf/1024{suffix}"] |= {"prefill_s": 2.0, "peak_mib": 500.0, "decode_bytes": 10**8, "prefill_flops": 10**9}
    results["lminf/1024/2"].update(cache_mib=30.0)  # only one round recorded it: no median of it
    results["lminf-gguf/1024"] = {"method": "lminf-gguf", "tokens": 1024, "round": 0, "error": "MemoryError: x"}
    results["lminf-gguf/1024/1"] = {"method": "lminf-gguf", "tokens": 1024, "round": 1, "decode_ms": 5.0, "read_gb_s": 10.0}
    results["lminf-gguf/1024/1"] |= {"prefill_s": 1.0, "peak_mib": 300.0, "decode_bytes": 10**8, "prefill_flops": 10**9}
    report = {"rates": {"bandwidth_gb_s": 1000.0, "matmul_tflop_s": 0.1}, "results": results}
    table = race_table(report)
    # decode medians 11.0 and 16.5 (range), floor 1e8 bytes at the median reading 10 GB/s; 3 rounds
    assert "| llama.cpp | 1,024 | 1024 | 11.0 [10.0-20.0] | 400 | - | 3 |" in table
    assert "| lminf | 1,024 | 512 | 16.5 [12.0-22.0] (10.0) | 500 | - | 3 |" in table
    # within rounds: 12/10, 22/20, 16.5/11 -> 1.2, 1.1, 1.5; floors 10, 20, 5 ms -> 1.2, 1.1, 3.3
    assert "| lminf | 1,024 | 1.20x [1.10-1.50] | 0.50x [0.50-0.50] | 1.20x [1.10-3.30] |" in table
    assert "| lminf-gguf | 1,024 | 0.25x | 1.00x | 0.50x |" in table  # round 1 only, against llama.cpp's round 1
    assert "- lminf-gguf at 1,024 (round 0): MemoryError: x." in table and "within a round" in table
    view = medians(report)["results"]
    assert "each cell measured reading as many bytes (5.0-20.0 GB/s)" in bandwidth_said(report)
    assert view["lminf/1024"]["decode_ms"] == 16.5 and view["lminf/1024"]["rounds"] == 3 and "cache_mib" not in view["lminf/1024"]


def test_more_rounds_extend_a_run_and_every_round_runs_every_engine(tmp_path, monkeypatch):
    calls = []

    def fake_child(context, fn, *args):  # no processes: what a cell would return
        calls.append(fn.__name__)
        return {"bandwidth_gb_s": 1.0, "matmul_tflop_s": 1.0} if fn.__name__ == "measure_rates" else {"decode_ms": 1.0}

    monkeypatch.setattr(race, "_in_child", fake_child)
    out, settings = tmp_path / "race.json", {"chunk": 8, "decode_tokens": 2, "threads": 1}
    report = race.run_race([48, 96], settings, out, {}, ["lminf", LLAMA_CPP], rounds=2, progress=False)
    assert list(report["results"]) == [
        "llama.cpp/48",
        "lminf/48",
        "llama.cpp/96",
        "lminf/96",
        "llama.cpp/48/1",
        "lminf/48/1",
        "llama.cpp/96/1",
        "lminf/96/1",
    ]  # round after round, the engines side by side within it
    assert [c["round"] for c in report["results"].values()] == [0] * 4 + [1] * 4 and len(calls) == 1 + 8
    report = race.run_race([48, 96], settings, out, {}, ["lminf", LLAMA_CPP], rounds=3, progress=False)
    assert len(report["results"]) == 12 and len(calls) == 1 + 12  # only round 2 ran
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        race.run_race([48], settings, out, {}, ["lminf"], rounds=0, progress=False)


@pytest.mark.slow  # runs the default model in child processes
def test_race_runs_every_engine(tmp_path):
    out, doc = tmp_path / "race.json", tmp_path / "benchmarks.md"
    run = lminf_cli(
        "bench", "--race", "--lengths", "48", "--decode-tokens", "2", "--threads", "1", "--out", str(out), "--doc", str(doc)
    )
    assert run.returncode == 0, run.stderr
    cells = json.loads(out.read_text())["results"]
    assert set(cells) == {f"{engine}/48" for engine in ENGINES}
    for engine in ENGINES:
        if engine != LLAMA_CPP:
            assert cells[f"{engine}/48"]["decode_ms"] > 0, cells[f"{engine}/48"]
    assert "decode_ms" in cells[f"{LLAMA_CPP}/48"] or "lminf[race]" in cells[f"{LLAMA_CPP}/48"]["error"]
    kv16 = cells["lminf-gguf-kv16/48"]
    assert kv16["settings"]["kv_dtype"] == "bfloat16" and kv16["cache_mib"] * 2 == cells["lminf-gguf/48"]["cache_mib"]
    # the default kernel's attention: lminf's C++ kernel where it builds (a compiler), torch's fused one elsewhere
    assert kv16["decode_kernel"] == ("native" if HAS_CXX else "flash_cpu")
    assert cells["lminf-gguf/48"]["decode_bytes"] < 0.2 * cells["lminf/48"]["decode_bytes"]
    assert all(cells[f"{e}/48"]["read_gb_s"] > 0 for e in ENGINES if e != LLAMA_CPP)  # each cell's own reading
    assert cells["lminf/48"]["input_major_weights"] > 0 and cells["lminf-row-major/48"]["input_major_weights"] == 0
    # kernel auto, float32 or 4-bit weights: lminf's C++ layers where they build
    assert cells["lminf/48"]["decode_layers"] == kv16["decode_layers"] == ("native" if HAS_CXX else "modules")
    assert cells["lminf-gguf/48"]["decode_step"] == "fast" and cells["lminf-gguf-forward/48"]["decode_step"] == "forward"
    assert doc.with_name("benchmarks-race.png").exists() and "lminf bench --race" in doc.read_text()


def test_race_decodes_64_tokens_by_default(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_race(lengths, settings, out_json, meta, engines, rounds):  # what the command would run
        seen.update(settings, engines=engines, rounds=rounds)
        return {"results": {}, "settings": settings}

    monkeypatch.setattr(eval_cli, "run_race", fake_race)
    monkeypatch.setattr(eval_cli, "race_table", lambda report: "")
    monkeypatch.setattr(eval_cli, "plot_bench", lambda report, path: None)
    assert main(["bench", "--race", "--lengths", "48", "--out", str(tmp_path / "race.json")]) == 0
    assert seen["decode_tokens"] == 64 and seen["rounds"] == 1
    assert main(["bench", "--race", "--rounds", "3", "--out", str(tmp_path / "race.json")]) == 0 and seen["rounds"] == 3
    assert main(["bench", "--race", "--lengths", "48", "--decode-tokens", "5", "--out", str(tmp_path / "r.json")]) == 0
    assert seen["decode_tokens"] == 5 and seen["engines"] == list(ENGINES)
    assert main(["bench", "--race", "--methods", "lminf,llama.cpp", "--out", str(tmp_path / "e.json")]) == 0
    assert seen["engines"] == ["lminf", "llama.cpp"]  # as given (run_race runs them in ENGINES' order)
    assert main(["bench", "--race", "--methods", "lminf,fast", "--out", str(tmp_path / "f.json")]) == 2
    assert "--race --methods takes a comma list of llama.cpp, lminf" in capsys.readouterr().err


def test_race_refuses_options_it_sets_itself():
    run = lminf_cli("bench", "--race", "--weights", "gguf")
    assert run.returncode == 2 and "drop those flags" in run.stderr
