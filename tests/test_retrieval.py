"""`lminf eval passkey` / `needle`: prompt building, scoring, resuming, determinism, heatmaps."""

from __future__ import annotations

import datetime
import json
import random
import re
import subprocess
import sys

import pytest
import torch

from lminf.eval.methods import Method
from lminf.eval.plots import plot_grid
from lminf.eval.retrieval import Needle, Passkey, accuracy, build_prompt, run_grid
from tests.helpers import tiny_model

HAYSTACK = "".join(f"Line {i}: the river ran quietly past the mill, and nobody in the village spoke of it.\n" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer(default_tokenizer):
    return default_tokenizer


@pytest.fixture(scope="module")
def needle(tokenizer):
    return Needle(tokenizer(HAYSTACK)["input_ids"], "river")


def test_prompts_have_the_exact_length_and_the_secret_at_its_depth(tokenizer, needle):
    for task in (Passkey(), needle):
        starts = []
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            ids, answer = build_prompt(task, tokenizer, 700, depth, random.Random(f"7/{depth}"))
            assert ids.shape == (1, 700)
            text = tokenizer.decode(ids[0])
            assert text.count(answer) >= 1 and text.rstrip().endswith(("The pass key is", 'is "'))
            starts.append(text.index(answer) / len(text))
        assert starts == sorted(starts) and starts[0] < 0.15 and starts[-1] > 0.85


def test_prompts_are_deterministic_and_vary_with_the_seed(tokenizer, needle):
    for task in (Passkey(), needle):
        a = build_prompt(task, tokenizer, 300, 0.5, random.Random("0/300/0.5/0"))
        b = build_prompt(task, tokenizer, 300, 0.5, random.Random("0/300/0.5/0"))
        c = build_prompt(task, tokenizer, 300, 0.5, random.Random("1/300/0.5/0"))
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert not torch.equal(a[0], c[0])


def test_bad_grid_values_are_clear_errors(tokenizer, needle):
    with pytest.raises(ValueError, match="too short"):
        build_prompt(Passkey(), tokenizer, 20, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        build_prompt(Passkey(), tokenizer, 300, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="fewer than"):
        build_prompt(needle, tokenizer, 100_000, 0.5, random.Random(0))


def test_scoring_is_exact_match():
    assert Passkey().correct(" 12345. The pass key", "12345")
    assert not Passkey().correct(" 123456", "12345") and not Passkey().correct(" the pass key", "12345")
    assert Needle([], "x").correct('Lantern".\n', "lantern")
    assert not Needle([], "x").correct("lantern and more", "lantern")


class Oracle(Method):
    """Reads the secret out of the prompt, as a method that retrieves perfectly would."""

    name = "oracle"

    def __init__(self, tokenizer, pattern):
        self.tokenizer, self.pattern, self.calls = tokenizer, pattern, 0

    def complete(self, model, ids, max_new_tokens, measured=None):
        self.calls += 1
        found = re.findall(self.pattern, self.tokenizer.decode(ids[0]))[0]
        return self.tokenizer(found, add_special_tokens=False)["input_ids"][:max_new_tokens]


class Silent(Method):
    name = "silent"

    def settings(self) -> dict:
        return {"says": "nothing"}

    def complete(self, model, ids, max_new_tokens, measured=None):
        return []


def test_grid_scores_resumes_and_plots(tmp_path, tokenizer, needle):
    model = tiny_model()  # only its config is read: the fake methods answer without it
    grid = dict(lengths=[200, 300], depths=[0.0, 1.0], samples=2, seed=3, progress=False)
    for task, pattern in ((Passkey(), r"pass key is (\d+)"), (needle, r'is "(\w+)"\.')):
        out = tmp_path / f"{task.name}.json"
        oracle = Oracle(tokenizer, pattern)
        report = run_grid(model, tokenizer, task, [oracle, Silent()], out_json=out, **grid)
        assert len(report["results"]) == 2 * 2 * 2 * 2 and oracle.calls == 8
        assert all(c["correct"] == (c["method"] == "oracle") for c in report["results"].values())
        again = run_grid(model, tokenizer, task, [oracle, Silent()], out_json=out, **grid)
        assert oracle.calls == 8 and again["results"] == report["results"]  # nothing redone
        fresh = run_grid(model, tokenizer, task, [Silent()], out_json=tmp_path / "fresh.json", **grid)
        answers = {k: c["answer"] for k, c in report["results"].items() if c["method"] == "silent"}
        assert answers == {k: c["answer"] for k, c in fresh["results"].items()}  # deterministic prompts
        (tmp_path / "fresh.json").unlink()
        with pytest.raises(ValueError, match="another run"):
            run_grid(model, tokenizer, task, [Silent()], out_json=out, **{**grid, "seed": 4})
        with pytest.raises(ValueError, match="identical settings"):
            run_grid(model, tokenizer, task, [Silent(), Mute()], out_json=out, **grid)
        saved = json.loads(out.read_text())
        assert saved["methods"] == {"oracle": {}, "silent": {"says": "nothing"}}
        check_grid_plot(plot_grid(saved, tmp_path / f"{task.name}.png"), saved, ["oracle", "silent"])


def test_grid_plot_cells_are_the_json_accuracies(tmp_path):
    # Not square and not uniform, so that a transposed or shuffled heatmap shows.
    results = {}
    for method, right in (("near", lambda n, d: d == 1.0), ("short", lambda n, d: n < 300)):
        for n in (200, 300, 400):
            for d in (0.0, 1.0):
                for sample in (0, 1):
                    correct = right(n, d) or (sample == 0 and n == 400)
                    results[f"{method}/{n}/{d:g}/{sample}"] = dict(
                        method=method, length=n, depth=d, sample=sample, correct=correct
                    )
    report = {"task": "passkey", "results": results}
    check_grid_plot(plot_grid(report, tmp_path / "grid.png"), report, ["near", "short"])


class Mute(Silent):
    name = "mute"


def check_grid_plot(fig, report: dict, methods: list[str]) -> None:
    """One heatmap per method whose cells (image and printed values) are the JSON's accuracies."""
    table = accuracy(report)
    heatmaps = [ax for ax in fig.axes if ax.get_title()]  # the colorbar has no title
    assert [ax.get_title() for ax in heatmaps] == list(table) == methods
    for ax, method in zip(heatmaps, table, strict=True):
        lengths = sorted({n for n, _ in table[method]})
        depths = sorted({d for _, d in table[method]})
        want = [[table[method][(n, d)] for n in lengths] for d in depths]
        assert ax.get_images()[0].get_array().tolist() == want
        assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for row in want for v in row]


@pytest.mark.slow
@pytest.mark.model
def test_cli_passkey_and_needle_on_the_default_model(tmp_path):
    doc = tmp_path / "hay.txt"
    doc.write_text(HAYSTACK)
    common = ["--lengths", "160", "--depths", "0,1", "--samples", "1", "--n-local", "64", "--methods", "vanilla,lminf,window"]
    for task, extra in (("passkey", []), ("needle", ["--document", str(doc)])):
        out = tmp_path / f"{task}.json"
        run = subprocess.run(
            [sys.executable, "-m", "lminf.cli", "eval", task, *common, *extra, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(out.read_text())
        assert {c["method"] for c in report["results"].values()} == {"vanilla", "lminf", "window"}
        assert out.with_suffix(".png").exists() and "| method |" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lminf.cli", "eval", "passkey", "--depths", "0,2", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "--depths" in bad.stderr


def test_the_original_passkey_format_is_the_lm_infinite_repositorys(tokenizer):
    ids, answer = build_prompt(Passkey("original"), tokenizer, 400, 0.3, random.Random("0/400/0.3/0"))
    text = tokenizer.decode(ids[0])
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.")
    assert "I will quiz you about the important information there." in text  # ours says "info there"
    assert f"The pass key is {answer}. Remember it. {answer} is the pass key." in text
    assert text.endswith(" What is the pass key? The pass key is") and 1 <= int(answer) <= 10_000_000
    assert Passkey("original").name == "passkey-original" and Passkey().name == "passkey"


def test_the_longheads_passkey_format_is_the_longheads_repositorys(tokenizer):
    keys = set()
    for seed in range(20):
        ids, answer = build_prompt(Passkey("longheads"), tokenizer, 400, 0.5, random.Random(seed))
        keys.add(int(answer))
    text = tokenizer.decode(ids[0])
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.")
    assert "I will quiz you about the important information there." in text
    assert all(1 <= k <= 50_000 for k in keys) and len(keys) == 20
    assert Passkey("longheads").name == "passkey-longheads"
    with pytest.raises(ValueError, match="passkey format"):
        Passkey("landmark")


def test_a_grid_records_time_and_memory_by_tier_and_the_report_shows_them(tmp_path, tokenizer):
    """A real strategy on a tiny model with the real tokenizer: InfLLM's blocks land in host memory."""
    from lminf.eval.methods import Patched
    from lminf.eval.report import write_report
    from lminf.strategies import InfLLM

    model = tiny_model(vocab_size=len(tokenizer))
    methods = [Patched(InfLLM(n_global=4, n_local=32, block_size=8, top_blocks=2)), Patched("sinks")]
    runs = tmp_path / "runs"
    grid = dict(lengths=[300], depths=[0.2], samples=1, seed=0, progress=False)
    report = run_grid(model, tokenizer, Passkey("original"), methods, out_json=runs / "passkey-original.json", **grid)
    cells = {c["method"]: c for c in report["results"].values()}
    assert cells["infllm"]["host_kv_mib"] > 0 and cells["sinks"]["host_kv_mib"] == 0
    assert 0 < cells["infllm"]["device_kv_mib"] and cells["infllm"]["rss_mib"] > 0
    assert cells["infllm"]["threads"] == torch.get_num_threads()  # the conditions of each cell's time
    finished = datetime.datetime.fromisoformat(cells["infllm"]["finished"])  # when, to tell shared hours apart later
    assert abs(datetime.datetime.now(datetime.timezone.utc) - finished) < datetime.timedelta(minutes=5)
    assert cells["infllm"]["load_1min"] >= 0
    text = write_report(runs, tmp_path / "docs" / "results.md").read_text()
    assert "![Passkey-original retrieval](results/passkey-original.png)" in text
    assert "| method | length | prompts | seconds | threads | device KV MiB | host KV MiB | block index MiB | RSS MiB |" in text
    assert "| infllm | 300 | 1 |" in text and "another machine" not in text
    saved = json.loads((runs / "passkey-original.json").read_text())
    saved["machine"] = saved["results"]["infllm/300/0.2/0"]["machine"]  # what the CLI records
    saved["results"]["sinks/300/0.2/0"]["machine"] = "a laptop"  # a grid resumed elsewhere
    saved["results"]["sinks/300/0.2/0"]["note"] = "with tests beside it"
    (runs / "passkey-original.json").write_text(json.dumps(saved))
    text = write_report(runs, tmp_path / "docs" / "results.md").read_text()
    assert "Timed on another machine, a laptop: sinks at 300 (compare seconds within one machine only)." in text
    assert "Note on sinks at 300 (1 of 1 prompts): with tests beside it." in text
    assert "| sinks | 300 | 1 | " in text and "un-noted" not in text  # no un-noted prompt to average
    # another run of the same task gets a section of its own, and cells of unequal size say so
    extra = dict(saved["results"]["sinks/300/0.2/0"], sample=1)
    saved["results"]["sinks/300/0.2/1"] = extra
    (runs / "passkey-original-long.json").write_text(json.dumps(saved))
    text = write_report(runs, tmp_path / "docs" / "results.md").read_text()
    assert "## Passkey-original retrieval (long)" in text
    assert "2 prompts per (length, depth) cell (1 in some: see the cost table)" in text
