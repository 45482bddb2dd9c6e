"""Retrieval tasks: can a method repeat something hidden far back in its input?

- `Passkey` (the paper's task): a 5-digit key hidden in repetitive filler sentences.
- `Needle`: a natural-language fact ("The special magic word for Anna is "lantern".")
  hidden in a real long text, asked about at the end.

`run_grid` builds, for every (length, depth, sample), a prompt of exactly `length` tokens
with the secret at `depth` (0: right after the instructions, 1: right before the question),
lets each method continue it greedily, and scores exact match. Prompts depend only on the
seed and the cell, so every method sees the same ones. The JSON is rewritten after each
cell, so an interrupted run resumes where it stopped (lminf.eval.runs);
lminf.eval.plots.plot_grid draws one accuracy heatmap (depth x length) per method.
"""

from __future__ import annotations

import functools
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf.eval.methods import Method, resolve_all
from lminf.eval.runs import RunStore, conditions
from lminf.families import training_length

NAMES = ["Anna", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
WORDS = [
    "lantern", "compass", "violin", "harbor", "meadow", "copper", "falcon", "orchard", "saddle", "glacier",
    "pepper", "anchor", "thimble", "canyon", "marble", "walnut", "beacon", "ribbon", "kettle", "tundra",
]  # fmt: skip


INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize {0}. "
    "I will quiz you about the important {1} there."
)
# format -> (task prefix, largest key); keys start at 1 except ours (5 digits)
PASSKEY_FORMATS = {
    "lminf": (INTRO.format("it", "info"), 99999),
    "original": (INTRO.format("it", "information"), 10_000_000),  # the LM-Infinite repository's
    "longheads": (INTRO.format("them", "information"), 50_000),  # the LongHeads repository's passkey_retrieval.py
}


class Passkey:
    """The paper's passkey retrieval prompt (after Mohtashami and Jaggi, 2023), in one of
    PASSKEY_FORMATS: "lminf" (5-digit keys), or exactly the task prefix and key range of the
    LM-Infinite ("original") or LongHeads ("longheads") repository."""

    name = "passkey"
    max_new_tokens = 8
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

    def __init__(self, format: str = "lminf") -> None:
        if format not in PASSKEY_FORMATS:
            raise ValueError(f"passkey format must be one of {sorted(PASSKEY_FORMATS)}, got {format!r}.")
        self.format = format
        self.intro, self.largest_key = PASSKEY_FORMATS[format]
        if format != "lminf":
            self.name = f"passkey-{format}"

    def secret(self, rng: random.Random) -> tuple[str, str, str]:
        """-> (sentence to hide, question at the end, answer)"""
        key = str(rng.randint(10000, 99999) if self.format == "lminf" else rng.randint(1, self.largest_key))
        return f" The pass key is {key}. Remember it. {key} is the pass key.", " What is the pass key? The pass key is", key

    def haystack(self, tokenizer: PreTrainedTokenizerBase, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """-> (at least `budget` filler tokens, indices where the secret may go)"""
        unit = tokenizer(self.filler, add_special_tokens=False)["input_ids"]
        reps = budget // len(unit) + 1
        return unit * reps, [r * len(unit) for r in range(reps + 1)]

    def correct(self, output: str, answer: str) -> bool:
        number = re.search(r"\d+", output)
        return number is not None and number.group() == answer


class Needle:
    """A fact about a name hidden in a real text, which is read from a random offset."""

    name = "needle"
    max_new_tokens = 8
    intro = "Read the text below. A special magic word is hidden in it; remember it, you will be asked for it.\n\n"

    def __init__(self, text_ids: list[int], document: str) -> None:
        self.text_ids, self.document = text_ids, document

    def secret(self, rng: random.Random) -> tuple[str, str, str]:
        name, word = rng.choice(NAMES), rng.choice(WORDS)
        question = f'\n\nWhat is the special magic word for {name}? The special magic word for {name} is "'
        return f'\nThe special magic word for {name} is "{word}".\n', question, word

    def haystack(self, tokenizer: PreTrainedTokenizerBase, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
        if len(self.text_ids) < budget:
            raise ValueError(f"{self.document} has {len(self.text_ids)} tokens, fewer than the {budget} this prompt needs.")
        start = rng.randint(0, len(self.text_ids) - budget)
        body = self.text_ids[start : start + budget]
        # The fact goes after a line break, so it reads as its own line.
        breaks = [t + 1 for t, piece in enumerate(tokenizer.batch_decode([[i] for i in body])) if "\n" in piece]
        return body, [0, *breaks, len(body)]

    def correct(self, output: str, answer: str) -> bool:
        return output.split('"')[0].strip().lower() == answer


def build_prompt(
    task, tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> tuple[torch.Tensor, str]:
    """A prompt of exactly `length` tokens with the task's secret at `depth` -> (ids (1, length), answer)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    hidden, question, answer = task.secret(rng)
    head = tokenizer("")["input_ids"]  # whatever special tokens the tokenizer starts a text with
    intro, hidden_ids, question_ids = (
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in (task.intro, hidden, question)
    )
    budget = length - len(head) - len(intro) - len(hidden_ids) - len(question_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the {task.name} prompt (needs {length - budget} tokens).")
    body, cuts = task.haystack(tokenizer, budget, rng)
    body = body[:budget]
    cut = min((c for c in cuts if c <= budget), key=lambda c: abs(c - depth * budget))
    ids = [*head, *intro, *body[:cut], *hidden_ids, *body[cut:], *question_ids]
    return torch.tensor([ids]), answer


def run_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task,
    methods: list[Method],
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every (method, length, depth, sample) cell not already in `out_json`; the JSON is rewritten after each."""
    methods = resolve_all(methods, model)
    store = RunStore(out_json, {"task": task.name, "seed": seed, "document": getattr(task, "document", None)})
    store.report.update({"training_length": training_length(model.config), **(meta or {})})
    store.record_methods(methods)
    todo = [(m, n, d, s) for m in methods for n in lengths for d in depths for s in range(samples)]
    bar = tqdm(todo, desc=task.name, unit="prompt", disable=not progress)
    for method, length, depth, sample in bar:
        compute = functools.partial(_grid_cell, model, tokenizer, task, method, length, depth, sample, seed, bar)
        store.cell(f"{method.name}/{length}/{depth:g}/{sample}", compute)
    return store.report


def _grid_cell(model, tokenizer, task, method: Method, length: int, depth: float, sample: int, seed: int, bar) -> dict:
    bar.set_postfix_str(f"{method.name} {length} tokens")
    rng = random.Random(f"{seed}/{length}/{depth:g}/{sample}")  # the same prompt for every method
    ids, answer = build_prompt(task, tokenizer, length, depth, rng)
    start = time.perf_counter()
    measured: dict = {}
    tokens = method.complete(model, ids.to(model.device), task.max_new_tokens, measured)
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    return {
        "method": method.name,
        "length": length,
        "depth": depth,
        "sample": sample,
        "answer": answer,
        "output": output,
        "correct": task.correct(output, answer),
        "seconds": round(time.perf_counter() - start, 2),
        **conditions(),
        **measured,  # memory of the cache by tier after the answer, and the resident set
    }


def accuracy(report: dict) -> dict[str, dict[tuple[int, float], float]]:
    """{method: {(length, depth): fraction correct}}"""
    tally: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for cell in report["results"].values():
        tally.setdefault(cell["method"], {}).setdefault((cell["length"], cell["depth"]), []).append(cell["correct"])
    return {m: {k: sum(v) / len(v) for k, v in cells.items()} for m, cells in tally.items()}
