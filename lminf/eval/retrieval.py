"""Retrieval tasks: can a method repeat something hidden far back in its input?

- `Passkey` (the paper's task): a 5-digit key hidden in repetitive filler sentences.
- `Needle`: a natural-language fact ("The special magic word for Anna is "lantern".")
  hidden in a real long text, asked about at the end.

`run_grid` builds, for every (length, depth, sample), a prompt of exactly `length` tokens
with the secret at `depth` (0: right after the instructions, 1: right before the question),
lets each method continue it greedily, and scores exact match. Prompts depend only on the
seed and the cell, so every method sees the same ones. The JSON is rewritten after each
cell, so an interrupted run resumes where it stopped; `plot_grid` draws one accuracy
heatmap (depth x length) per method.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAMES = ["Anna", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
WORDS = [
    "lantern", "compass", "violin", "harbor", "meadow", "copper", "falcon", "orchard", "saddle", "glacier",
    "pepper", "anchor", "thimble", "canyon", "marble", "walnut", "beacon", "ribbon", "kettle", "tundra",
]  # fmt: skip


class Passkey:
    """The paper's passkey retrieval prompt (after Mohtashami and Jaggi, 2023)."""

    name = "passkey"
    max_new_tokens = 8
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important info there."
    )
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

    def secret(self, rng: random.Random) -> tuple[str, str, str]:
        """-> (sentence to hide, question at the end, answer)"""
        key = str(rng.randint(10000, 99999))
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
    methods: list,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every (method, length, depth, sample) cell not already in `out_json`; the JSON is rewritten after each."""
    grid = {"task": task.name, "seed": seed, "document": getattr(task, "document", None)}
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    if report and any(report.get(k) != v for k, v in grid.items()):
        raise ValueError(f"{out_json} holds another run ({ {k: report.get(k) for k in grid} }); use another --out.")
    report.update({**grid, "training_length": model.config.max_position_embeddings, **(meta or {})})
    cells = report.setdefault("results", {})
    settings = report.setdefault("methods", {})
    todo = [(m, n, d, s) for m in methods for n in lengths for d in depths for s in range(samples)]
    bar = tqdm(todo, desc=task.name, unit="prompt", disable=not progress)
    for method, length, depth, sample in bar:
        key = f"{method.name}/{length}/{depth:g}/{sample}"
        if key in cells:
            continue  # done in an earlier run
        bar.set_postfix_str(f"{method.name} {length} tokens")
        rng = random.Random(f"{seed}/{length}/{depth:g}/{sample}")  # the same prompt for every method
        ids, answer = build_prompt(task, tokenizer, length, depth, rng)
        start = time.perf_counter()
        output = tokenizer.decode(method.complete(model, ids.to(model.device), task.max_new_tokens), skip_special_tokens=True)
        cells[key] = {
            "method": method.name,
            "length": length,
            "depth": depth,
            "sample": sample,
            "answer": answer,
            "output": output,
            "correct": task.correct(output, answer),
            "seconds": round(time.perf_counter() - start, 2),
        }
        settings[method.name] = vars(method) if hasattr(method, "__dataclass_fields__") else {}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2))
    return report


def accuracy(report: dict) -> dict[str, dict[tuple[int, float], float]]:
    """{method: {(length, depth): fraction correct}}"""
    tally: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for cell in report["results"].values():
        tally.setdefault(cell["method"], {}).setdefault((cell["length"], cell["depth"]), []).append(cell["correct"])
    return {m: {k: sum(v) / len(v) for k, v in cells.items()} for m, cells in tally.items()}


def plot_grid(report: dict, out_png: Path) -> None:
    """One heatmap per method: depth (rows) x length (columns), accuracy in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = accuracy(report)
    methods = list(table)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        lengths = sorted({n for n, _ in table[method]})
        depths = sorted({d for _, d in table[method]})
        grid = [[table[method].get((n, d), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths] if ax is axes[0][0] else [])
        ax.set(title=method, xlabel="prompt length (tokens)")
    axes[0][0].set_ylabel("depth of the secret (0 = start)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{report['task']} retrieval, {report.get('model', '')}", y=1.04)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
