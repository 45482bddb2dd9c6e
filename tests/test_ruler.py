"""`lminf eval ruler`: RULER's synthetic tasks, their prompts, fitting, scoring, resuming, report."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from lminf.eval import cli
from lminf.eval.methods import Method
from lminf.eval.plots import plot_ruler
from lminf.eval.report import write_report
from lminf.eval.ruler import NOISE, TASKS, Sources, fit, render, run_ruler, score, scores, zeta
from lminf.eval.runs import merge_runs
from tests.helpers import tiny_model

BOOK = " ".join(f"Sentence {i} tells of the mill by the river, where nobody spoke of it." for i in range(3000))


@pytest.fixture(scope="module")
def tokenizer(default_tokenizer):
    return default_tokenizer


@pytest.fixture(scope="module")
def sources():
    return Sources.load(BOOK, "mill")


def text_of(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_fills_its_length_and_holds_its_answers(name, tokenizer, sources):
    task = TASKS[name]
    for length in (1024, 3000):
        ids, prompt, units = fit(task, tokenizer, length, f"0/{name}/{length}/0", sources)
        budget = length - task.tokens_to_generate
        assert ids == render(tokenizer, prompt) and len(ids) <= budget
        # the largest haystack that fits: one unit more does not
        bigger = render(tokenizer, task.make(units + 1, random.Random(f"0/{name}/{length}/0"), sources, length))
        assert len(bigger) > budget
        text = text_of(tokenizer, ids)
        assert text.endswith(prompt.answer_prefix) and "<|im_start|>assistant" in text  # the chat template's turn
        asked = text[: text.rindex("<|im_start|>assistant")]
        assert all(expected in asked for expected in prompt.outputs)


def test_needles_say_what_the_question_asks(tokenizer, sources):
    for name in ("niah_single_1", "niah_multikey_1", "niah_multivalue", "niah_multiquery", "niah_multikey_3"):
        ids, prompt, _ = fit(TASKS[name], tokenizer, 2000, f"1/{name}", sources)
        text = text_of(tokenizer, ids)
        question = re.search(r"special magic \w+ for (.+?) mentioned in the provided text\?", text).group(1)
        keys = re.split(r", and |, ", question)
        found = [v for k in keys for v in re.findall(rf"One of the special magic \w+ for {re.escape(k)} is: (\S+)\.", text)]
        assert sorted(found) == sorted(prompt.outputs)
    ids, prompt, units = fit(TASKS["niah_single_1"], tokenizer, 2000, "2", sources)
    assert text_of(tokenizer, ids).count(NOISE) == units
    distractors = fit(TASKS["niah_multikey_2"], tokenizer, 2000, "2", sources)
    assert text_of(tokenizer, distractors[0]).count("One of the special magic numbers for") == distractors[2] + 1
    assert "A special magic number is hidden" in text_of(tokenizer, ids)  # one answer: RULER's singular wording
    plural = fit(TASKS["niah_multivalue"], tokenizer, 2000, "2", sources)
    assert "Some special magic numbers are hidden" in text_of(tokenizer, plural[0]) and len(plural[1].outputs) == 4


def test_book_needles_spread_over_the_depths(tokenizer, sources):
    starts = []
    for sample in range(6):
        ids, prompt, _ = fit(TASKS["niah_single_2"], tokenizer, 2000, f"0/niah_single_2/2000/{sample}", sources)
        text = text_of(tokenizer, ids)
        starts.append(text.index(prompt.outputs[0]) / len(text))
        assert "Sentence 0 tells of the mill" in text  # the book from its start, as RULER reads its essays
    assert min(starts) < 0.4 and max(starts) > 0.6


def test_variable_tracking_chains_lead_to_the_value(tokenizer, sources):
    ids, prompt, _ = fit(TASKS["vt"], tokenizer, 2000, "3", sources)
    text = text_of(tokenizer, ids)
    task = text[text.rindex("Memorize and track") :]  # after the worked example
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    holds = {re.search(rf"VAR (\w+) = {value}\b", task).group(1)}
    for _ in range(10):  # follow the assignments
        holds |= {a for a, b in re.findall(r"VAR (\w+) = VAR (\w+)", task) if b in holds}
    assert sorted(holds) == sorted(prompt.outputs) and len(holds) == 5
    assert task.index(f"VAR {prompt.outputs[0]} = {value}") < task.index(f"= VAR {prompt.outputs[0]}")


def test_word_counting_tasks_count_as_ruler_says(tokenizer, sources):
    ids, prompt, units = fit(TASKS["cwe"], tokenizer, 4096, "4", sources)
    listed = text_of(tokenizer, ids).rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. (\S+)", listed))
    assert len(counts) == units and {counts[w] for w in prompt.outputs} == {30}
    assert {c for w, c in counts.items() if w not in prompt.outputs} == {3}
    ids, prompt, _ = fit(TASKS["fwe"], tokenizer, 4096, "5", sources)
    coded = text_of(tokenizer, ids).split("three most frequently appeared coded words. ")[1].split("\nQuestion:")[0]
    ranked = [w for w, _ in Counter(coded.split()).most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == prompt.outputs
    assert zeta(2.0) == pytest.approx(3.14159265358979**2 / 6, rel=1e-9)


def test_prompts_are_deterministic_per_cell(tokenizer, sources):
    a = fit(TASKS["niah_multikey_3"], tokenizer, 1500, "0/x/1500/0", sources)
    b = fit(TASKS["niah_multikey_3"], tokenizer, 1500, "0/x/1500/0", sources)
    c = fit(TASKS["niah_multikey_3"], tokenizer, 1500, "0/x/1500/1", sources)
    assert a[0] == b[0] and a[1].outputs == b[1].outputs and a[0] != c[0]


def test_scoring_is_rulers_string_match_all():
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score("A-B and c-d\x01", ["a-b", "C-D", "e"]) == pytest.approx(2 / 3)
    assert score("", ["x"]) == 0.0


def test_too_short_a_length_is_a_clear_error_before_any_prompt_runs(tmp_path, tokenizer, sources):
    with pytest.raises(ValueError, match="too short"):
        fit(TASKS["vt"], tokenizer, 300, "0", sources)
    with pytest.raises(ValueError, match="too short for cwe"):
        run_ruler(tiny_model(), tokenizer, [Silent()], ["fwe", "cwe"], [600], 1, 0, sources, tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()  # not even fwe's prompt ran first


def test_generation_stops_after_a_stop_token():
    import torch
    from transformers import DynamicCache

    from lminf.generation import greedy

    model, ids = tiny_model(), torch.tensor([[5, 9, 17, 3, 40]])
    free = greedy(model, ids, DynamicCache(), 6)
    assert greedy(model, ids, DynamicCache(), 6, stop={free[2]}) == free[: free.index(free[2]) + 1]


class Echo(Method):
    """Answers with its whole prompt: every expected string is in it, so it scores 1 everywhere."""

    name = "echo"

    def __init__(self):
        self.calls = 0

    def complete(self, model, ids, max_new_tokens, measured=None, stop=()):
        self.calls += 1
        return ids[0].tolist()


class Silent(Method):
    name = "silent"

    def settings(self) -> dict:
        return {"says": "nothing"}

    def complete(self, model, ids, max_new_tokens, measured=None, stop=()):
        return []


def test_grid_scores_resumes_plots_and_reports(tmp_path, tokenizer, sources):
    model = tiny_model()  # only its config is read: the fake methods answer without it
    echo = Echo()
    tasks = ["niah_single_1", "vt", "fwe"]
    grid = dict(tasks=tasks, lengths=[1100, 1500], samples=2, seed=1, sources=sources, progress=False)
    out = tmp_path / "runs" / "ruler.json"
    report = run_ruler(model, tokenizer, [echo, Silent()], out_json=out, **grid)
    assert len(report["results"]) == 2 * 3 * 2 * 2 and echo.calls == 12
    assert all(c["score"] == (c["method"] == "echo") for c in report["results"].values())
    again = run_ruler(model, tokenizer, [echo, Silent()], out_json=out, **grid)
    assert echo.calls == 12 and again["results"] == report["results"]  # nothing redone
    with pytest.raises(ValueError, match="another run"):
        run_ruler(model, tokenizer, [Silent()], out_json=out, **{**grid, "seed": 2})
    with pytest.raises(ValueError, match="unknown RULER task"):
        run_ruler(model, tokenizer, [Silent()], out_json=out, **{**grid, "tasks": ["qa_1"]})
    saved = json.loads(out.read_text())
    assert scores(saved)["echo"][("vt", 1100)] == 100 and scores(saved)["silent"][("fwe", 1500)] == 0
    assert any("Paul Graham" in s for s in saved["substitutions"])

    fig = plot_ruler(saved, tmp_path / "ruler.png")
    for ax, method in zip(fig.axes[:2], ["echo", "silent"], strict=True):
        assert ax.get_title() == method
        assert [t.get_text() for t in ax.texts] == ["100" if method == "echo" else "0"] * 6
        assert [t.get_text() for t in ax.get_yticklabels()] == (tasks if method == "echo" else [""] * 3)

    text = write_report(out.parent, tmp_path / "docs" / "results.md").read_text()
    assert "## RULER, synthetic tasks" in text and "![RULER, synthetic tasks](results/ruler.png)" in text
    assert "| echo | 1,100 | 100 | 100 | 100 | 100.0 |" in text and "| silent | 1,500 | 0 | 0 | 0 | 0.0 |" in text
    assert "- silent: niah_single_1 at 1,100" in text and "- echo: none" in text
    assert "Not run" not in text
    # another run: a section of its own, which says where a method did not run
    saved["results"] = {k: c for k, c in saved["results"].items() if (c["method"], c["length"]) != ("silent", 1500)}
    (out.parent / "ruler-methods.json").write_text(json.dumps(saved))
    text = write_report(out.parent, tmp_path / "docs" / "results.md").read_text()
    assert "## RULER, synthetic tasks\n" in text and "## RULER, synthetic tasks (methods)\n" in text
    assert "Not run: silent at 1,500." in text


def test_a_grid_split_over_workers_merges_into_the_one_run(tmp_path, tokenizer, sources):
    """Two processes that each ran some methods (and one method at different lengths) join into
    what one process running them all writes; anything that would lose or pick data is refused."""
    model = tiny_model()
    grid = dict(tokenizer=tokenizer, tasks=["niah_single_1", "fwe"], samples=1, seed=1, sources=sources, progress=False)
    whole = run_ruler(model, methods=[Echo(), Silent()], lengths=[1100, 1500], out_json=tmp_path / "whole.json", **grid)
    a, b, joined = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "joined.json"
    run_ruler(model, methods=[Echo()], lengths=[1100, 1500], out_json=a, **grid)
    run_ruler(model, methods=[Silent()], lengths=[1100], out_json=b, **grid)
    run_ruler(model, methods=[Silent()], lengths=[1500], out_json=b, **grid)  # the worker resumed, longer prompts

    def cells(report):  # what the grid measured; times and load differ from run to run
        return {k: (c["output"], c["score"], c["prompt_tokens"]) for k, c in report["results"].items()}

    done = subprocess.run(
        [sys.executable, "-m", "lminf.cli", "eval", "merge", str(a), str(b), "--out", str(joined), "--about", "two workers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    merged = json.loads(joined.read_text())
    assert cells(merged) == cells(whole) and merged["methods"] == whole["methods"]
    assert merged["about"] == "two workers" and "How it was run: two workers" in write_report_of(merged, tmp_path)
    assert merge_runs([joined, a, b], joined) == merged  # merging again as the workers go on changes nothing

    with pytest.raises(ValueError, match="exists and is not one of the runs"):
        merge_runs([a, b], joined)
    changed = json.loads(b.read_text())
    changed["results"]["silent/fwe/1500/0"]["score"] = 0.5
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="both hold cell silent/fwe/1500/0"):
        merge_runs([a, b, tmp_path / "changed.json"], tmp_path / "x.json")
    changed = {**json.loads(b.read_text()), "seed": 2}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="differ in seed"):
        merge_runs([a, tmp_path / "changed.json"], tmp_path / "x.json")
    changed = json.loads(b.read_text())
    changed["methods"]["echo"] = {"says": "more"}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="both hold method echo"):
        merge_runs([a, tmp_path / "changed.json"], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def write_report_of(report: dict, tmp_path) -> str:
    runs = tmp_path / "report-runs"
    runs.mkdir(exist_ok=True)
    (runs / "ruler.json").write_text(json.dumps(report))
    return write_report(runs, tmp_path / "report" / "results.md").read_text()


def test_the_real_text_haystack_falls_back_to_pythons_manual(monkeypatch):
    monkeypatch.setattr(cli, "available", lambda: [])
    name, text = cli._haystack(None)
    assert name == "python-manual" and len(text.split()) > 50_000  # room for 32k-token prompts


@pytest.mark.slow
@pytest.mark.model
def test_cli_ruler_on_the_default_model(tmp_path):
    out = tmp_path / "ruler.json"
    args = ["--tasks", "niah_single_1,fwe", "--lengths", "600", "--methods", "vanilla,lminf", "--n-local", "256"]
    run = subprocess.run(
        [sys.executable, "-m", "lminf.cli", "eval", "ruler", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert {(c["method"], c["task"]) for c in report["results"].values()} == {
        (m, t) for m in ("vanilla", "lminf") for t in ("niah_single_1", "fwe")
    }
    assert all(c["prompt_tokens"] + TASKS[c["task"]].tokens_to_generate <= 600 for c in report["results"].values())
    assert out.with_suffix(".png").exists() and "| method | length | niah_single_1 | fwe | average |" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lminf.cli", "eval", "ruler", "--tasks", "qa_1", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "qa_1" in bad.stderr
