"""lminf as an lm-evaluation-harness model (`--model lminf`): inside the window every strategy
scores and generates what the harness's own `hf` model does on the same model, and the command
line runs a task end to end. Tasks and data are written here (offline)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only, never the hub
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lminf.cli import main  # noqa: E402
from lminf.eval.harness import LminfLM  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

WINDOW = 256  # the tiny model's training length: lminf's default window, hf's max_length
TASKS = ["lminf_choice", "lminf_rolling", "lminf_gen"]


def write_tasks(folder) -> None:
    """Three tasks, one per request type: multiple choice (loglikelihood), a document's
    perplexity (loglikelihood_rolling), a greedy answer cut at a stop string (generate_until)."""
    colours = [("sky", 2), ("grass", 1), ("sun", 3), ("rose", 0), ("sea", 2), ("leaf", 1)]
    rows = {
        "choice": [
            {"q": f"What colour is the {t}?", "options": ["red", "green", "blue", "yellow"], "answer": a} for t, a in colours
        ],
        "docs": [
            {"text": " ".join(f"Line {i} of tale {s}: the miller's cat crossed the yard." for i in range(6))} for s in range(2)
        ],
        "gen": [{"q": f"Count: {a}, {a + 1}, {a + 2},", "target": f" {a + 3}"} for a in range(3)],
    }
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in items))

    def data(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\ntest_split: test\n"

    (folder / "choice.yaml").write_text(
        "task: lminf_choice\n" + data("choice") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{options}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "rolling.yaml").write_text(
        "task: lminf_rolling\n" + data("docs") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'
    )
    (folder / "gen.yaml").write_text(
        "task: lminf_gen\n" + data("gen") + 'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: [",", "\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def setup(default_tokenizer, tmp_path_factory):
    """A tiny random model (training length 256) with the default tokenizer, saved; the tasks; hf's answers."""
    tokenizer = default_tokenizer
    model = tiny_model(
        vocab_size=len(tokenizer), max_position_embeddings=WINDOW,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tasks = tmp_path_factory.mktemp("tasks")
    write_tasks(tasks)
    manager = TaskManager(include_path=str(tasks))  # indexes every task of the harness: 10 s, once
    hf = responses(evaluate("hf", f"pretrained={folder},dtype=float32", manager))
    return folder, tasks, hf, manager


def evaluate(model: str, model_args: str, manager: TaskManager) -> dict:
    return simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=manager, log_samples=True, device="cpu", batch_size=1
    )


def responses(run: dict) -> dict:
    """Each task's raw answers, request by request: (loglikelihood, is_greedy), a loglikelihood, or text."""
    return {task: [r[0] for sample in run["samples"][task] for r in sample["resps"]] for task in TASKS}


@pytest.mark.parametrize("strategy", ["lminf", "sinks", "sirllm", "vanilla"])
def test_inside_the_window_every_request_equals_hf(setup, strategy):
    folder, _, hf, manager = setup
    ours = responses(evaluate("lminf", f"pretrained={folder},strategy={strategy}", manager))
    for (ll, greedy), (ll_hf, greedy_hf) in zip(ours["lminf_choice"], hf["lminf_choice"], strict=True):
        assert ll == pytest.approx(ll_hf, abs=1e-4) and greedy == greedy_hf
    for ll, ll_hf in zip(ours["lminf_rolling"], hf["lminf_rolling"], strict=True):
        assert ll == pytest.approx(ll_hf, rel=1e-5)
    assert ours["lminf_gen"] == hf["lminf_gen"]
    assert len(ours["lminf_choice"]) == 24 and len(ours["lminf_rolling"]) == 2 and len(ours["lminf_gen"]) == 3


def test_the_command_runs_a_task_end_to_end(setup, tmp_path):
    folder, tasks, _, _ = setup
    args = ["--model", "lminf", "--model_args", f"pretrained={folder},strategy=lminf,n_local=128,n_global=4"]
    code = main(
        ["lm-eval", "run", *args, "--tasks", "lminf_choice", "--include_path", str(tasks), "--output_path", str(tmp_path)]
    )
    assert code == 0
    written = [json.loads(p.read_text()) for p in tmp_path.rglob("results_*.json")]
    assert len(written) == 1 and 0 <= written[0]["results"]["lminf_choice"]["acc,none"] <= 1


def test_bad_settings_are_refused_with_the_reason(setup):
    folder, _, _, _ = setup
    with pytest.raises(ValueError, match="unknown strategy|not a registered|choose from"):
        LminfLM(pretrained=str(folder), strategy="nope")
    with pytest.raises(ValueError, match="vanilla takes no settings"):
        LminfLM(pretrained=str(folder), strategy="vanilla", n_local=64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LminfLM(pretrained=str(folder), dtype="float64")
    model = LminfLM(pretrained=str(folder))
    with pytest.raises(ValueError, match="do_sample=false"):
        model.greedy_until("Count: 1, 2,", {"do_sample": True, "temperature": 0.7})


def test_generation_stops_at_the_first_stop_string_as_hf_does(setup):
    """The stop string is taken from the model's own free answer, so the cut is exercised."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    folder, _, _, _ = setup
    ours, hf = LminfLM(pretrained=str(folder)), HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=1)
    context = "Count: 1, 2, 3,"
    free = ours.greedy_until(context, {"until": [], "max_gen_toks": 8})
    stop = free[len(free) // 2 :][:2]
    assert stop and stop in free
    cut = ours.greedy_until(context, {"until": [stop], "max_gen_toks": 8})
    assert cut == free[: free.index(stop)]
    request = SimpleNamespace(args=(context, {"until": [stop], "max_gen_toks": 8, "do_sample": False}))
    assert hf.generate_until([request]) == [cut]
