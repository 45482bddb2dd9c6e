"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated offline: `lminf eval ruler`.

Written here from the paper and the task descriptions of NVIDIA/RULER (scripts/synthetic.yaml,
scripts/data/synthetic/*.py): the same templates, parameters, length fitting and scoring.
Eleven of its thirteen tasks; qa_1 and qa_2 need SQuAD and HotpotQA, which are not available
offline, and are left out. Substitutions, recorded in every run's JSON (`SUBSTITUTIONS`):
- the "essay" haystack (Paul Graham's essays) is a public-domain book from `lminf data`
  (Python's own reference manual, `pydoc_data.topics`, where no book is extracted), split
  into sentences by a regular expression instead of nltk's punkt;
- word keys are adjective-noun pairs from the `wonderwords` package, as in RULER, but only of
  words without spaces; variable names are distinct (RULER may draw one twice).

A prompt is the chat template's rendering of the task (few-shot turns first, as RULER puts
its examples before the task) plus the task's answer prefix, which starts the answer; a
model without a chat template reads the plain text. `fit` makes it as long as fits: the
largest haystack (in the task's units: sentences, words) whose prompt plus the task's
tokens to generate stays within the cell's length, found by bisection. A cell's prompt
depends only on (seed, task, length, sample), so every method sees the same ones.

Scoring is RULER's string_match_all: the share of expected strings found in the answer
(case-insensitive substring), per prompt; a task's score is the mean over prompts, x100.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import random
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf.eval.methods import Method, resolve_all
from lminf.eval.runs import RunStore, conditions
from lminf.extras import RULER, require
from lminf.families import training_length

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 needle depths (percent of the sentences)
SUBSTITUTIONS = [
    "haystack: {document} instead of Paul Graham's essays, split into sentences by a regular expression (not nltk punkt)",
    "qa_1 and qa_2 left out: SQuAD and HotpotQA are not available offline",
    "word keys: wonderwords {wonderwords} adjective-noun pairs of words without spaces; variable names distinct",
]


@dataclass
class Prompt:
    """One RULER prompt before rendering: earlier (user, assistant) turns (the few-shot
    example), the task (the user's message), the start of the answer, the expected strings."""

    task: str
    answer_prefix: str
    outputs: list[str]
    turns: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Sources:
    """What the generators draw from: word lists and the book haystack (a list of words)."""

    nouns: list[str]
    adjectives: list[str]
    verbs: list[str]
    book: list[str]
    document: str

    @classmethod
    def load(cls, book_text: str, document: str) -> Sources:
        require("wonderwords", RULER, "eval")

        def words(name: str) -> list[str]:
            text = (resources.files("wonderwords.assets") / name).read_text(encoding="utf-8")
            return sorted({w.strip() for w in text.splitlines() if w.strip() and " " not in w.strip()})

        book = re.sub(r"\s+", " ", book_text).strip().split(" ")
        return cls(words("nounlist.txt"), words("adjectivelist.txt"), words("verblist.txt"), book, document)

    @functools.cached_property
    def common_words(self) -> list[str]:
        """cwe's vocabulary: every distinct word of the three lists, in a fixed shuffled order."""
        words = sorted({*self.nouns, *self.adjectives, *self.verbs})
        random.Random(0).shuffle(words)
        return words


# -- the tasks --------------------------------------------------------------------------


class Task:
    """A RULER task: `make(units, rng, sources, length)` builds its prompt around a haystack of
    `units` (sentences, words), at least `min_units`, at most `max_units(sources)`."""

    tokens_to_generate: int
    min_units: int

    def make(self, units: int, rng: random.Random, sources: Sources, length: int) -> Prompt:
        raise NotImplementedError

    def max_units(self, sources: Sources) -> int:
        return 1 << 30


@dataclass(frozen=True)
class Niah(Task):
    """Needle in a haystack: `keys` needles "One of the special magic {values} for {key} is:
    {value}." hidden among `haystack` units ("noise": the grass-is-green sentences; "book":
    sentences of a real text, needles at RULER's depths; "needle": distractor needles with
    other keys), `values` values per key, `queries` keys asked for."""

    haystack: str
    key_type: str
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1
    tokens_to_generate: int = 128
    min_units: int = 4  # room for every needle

    def draw(self, kind: str, rng: random.Random, sources: Sources) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return f"{rng.choice(sources.adjectives)}-{rng.choice(sources.nouns)}"

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.value_type} for {key} is: {value}."

    def make(self, units: int, rng: random.Random, sources: Sources, length: int) -> Prompt:
        keys = [self.draw(self.key_type, rng, sources) for _ in range(max(self.keys, self.queries))]
        values = [[self.draw(self.value_type, rng, sources) for _ in range(self.values)] for _ in keys]
        needles = [self.needle(k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
        rng.shuffle(needles)
        context = self.context(units, needles, rng, sources)
        asked = rng.sample(range(len(keys)), self.queries)
        query = ", ".join(keys[i] for i in asked[:-1]) + (", and " if len(asked) > 1 else "") + keys[asked[-1]]
        outputs = [v for i in asked for v in values[i]]
        if self.queries * self.values == 1:  # RULER words the single-answer question in the singular
            kind = self.value_type.removesuffix("s")
            task = (
                f"A special magic {kind} is hidden within the following text. Make sure to memorize it. I will quiz you "
                f"about the {kind} afterwards.\n{context}\nWhat is the special magic {kind} for {query} mentioned in the "
                "provided text?"
            )
            return Prompt(task, f" The special magic {kind} for {query} mentioned in the provided text is", outputs)
        kind = self.value_type
        task = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
            f"about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned in the "
            "provided text?"
        )
        return Prompt(task, f" The special magic {kind} for {query} mentioned in the provided text are", outputs)

    def context(self, units: int, needles: list[str], rng: random.Random, sources: Sources) -> str:
        if self.haystack == "book":
            words = sources.book * (units // len(sources.book) + 1)
            sentences = split_sentences(" ".join(words[:units]))
            cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
            pieces, start = [], 0
            for cut, needle in zip(cuts, needles, strict=True):
                pieces += [*sentences[start:cut], needle]
                start = cut
            return " ".join(pieces + sentences[start:])
        if self.haystack == "noise":
            sentences = [NOISE] * units
        else:  # distractors: needles with keys and values of their own
            sentences = [
                self.needle(self.draw(self.key_type, rng, sources), self.draw(self.value_type, rng, sources))
                for _ in range(units)
            ]
        for at, needle in zip(sorted(rng.sample(range(units), len(needles)), reverse=True), needles, strict=True):
            sentences.insert(at, needle)
        return "\n".join(sentences)


@dataclass(frozen=True)
class VariableTracking(Task):
    """Chains of assignments ("VAR ABCDE = 12345", then "VAR FGHIJ = VAR ABCDE", ...) hidden in
    noise sentences; which variables hold the first chain's value? One worked example first."""

    chains: int = 1
    hops: int = 4
    tokens_to_generate: int = 30
    min_units: int = 5  # room for one chain's statements

    def template(self, context: str, value: int) -> tuple[str, str]:
        task = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
        )
        prefix = (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{self.hops + 1} variables are assigned the value {value}, they are: "
        )
        return task, prefix

    def chain_text(self, units: int, rng: random.Random, letters: int) -> tuple[str, int, list[str]]:
        names: list[str] = []
        while len(names) < (self.hops + 1) * self.chains:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            names += [name] * (name not in names)
        sentences = [NOISE] * units
        first_value, first_names = 0, []
        for c in range(self.chains):
            chain_names = names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)]
            value = rng.randint(10000, 99999)
            chain = [f"VAR {chain_names[0]} = {value}"]
            chain += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(self.hops)]
            for j, at in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
                sentences.insert(at + j, chain[j])  # in order, each at a random place
            if c == 0:
                first_value, first_names = value, chain_names
        return "\n".join(sentences).replace(". \n", ".\n"), first_value, first_names

    def make(self, units: int, rng: random.Random, sources: Sources, length: int) -> Prompt:
        context, value, names = self.chain_text(18, rng, letters=3)  # RULER's example: about 500 tokens
        task, prefix = self.template(context, value)
        example = f"{task}{prefix} {' '.join(names)}\n"
        context, value, names = self.chain_text(units, rng, letters=5)
        task, prefix = self.template(context, value)
        return Prompt(f"{example}\n{task}", prefix, names)


@dataclass(frozen=True)
class CommonWords(Task):
    """A numbered list of words, `common` of them repeated `freq_common` times and the rest
    `freq_uncommon` times; which are the most common? One worked example first (shorter lists
    below 4,096 tokens, as RULER)."""

    freq_common: int = 30
    freq_uncommon: int = 3
    common: int = 10
    tokens_to_generate: int = 120
    min_units: int = 11

    def max_units(self, sources: Sources) -> int:
        return len(sources.common_words)

    def numbered(self, words: list[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def example(self, distinct: int, common_reps: int, uncommon_reps: int, rng: random.Random, sources: Sources):
        if distinct > len(sources.common_words):
            raise ValueError(f"cwe needs {distinct} distinct words; the word lists hold {len(sources.common_words)}.")
        chosen = rng.sample(sources.common_words, len(sources.common_words))[:distinct]  # one more word adds one
        listed = chosen[: self.common] * common_reps + chosen[self.common :] * uncommon_reps
        rng.shuffle(listed)
        task = (
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            f"that appear most often.\n{self.numbered(listed)}\nQuestion: What are the {self.common} most common words in "
            "the above list?"
        )
        return task, f" Answer: The top {self.common} words that appear most often in the list are:", chosen[: self.common]

    def make(self, units: int, rng: random.Random, sources: Sources, length: int) -> Prompt:
        short = length < 4096
        task, prefix, answer = self.example(20 if short else 40, 3 if short else 10, 1 if short else 3, rng, sources)
        shot = (task, f"{prefix.strip()} {self.numbered(answer)}")
        reps = (6, 1) if short else (self.freq_common, self.freq_uncommon)
        task, prefix, answer = self.example(units, *reps, rng, sources)
        return Prompt(task, prefix, answer, [shot])


@dataclass(frozen=True)
class FrequentWords(Task):
    """Coded words (random 6-letter strings) repeated with Zipf-like counts (exponent `alpha`),
    the most frequent one being '...' noise; which three come next?"""

    alpha: float = 2.0
    word_length: int = 6
    tokens_to_generate: int = 50
    min_units: int = 10

    def make(self, units: int, rng: random.Random, sources: Sources, length: int) -> Prompt:
        size = max(4, (length - self.tokens_to_generate) // 50)  # RULER's vocabulary size for a length
        vocab = sorted({"".join(rng.choices(string.ascii_lowercase, k=self.word_length)) for _ in range(size)})
        rng.shuffle(vocab)
        vocab[0] = "..."
        total = zeta(self.alpha)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(units * k**-self.alpha / total))]
        rng.shuffle(words)
        task = (
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            f"appeared coded words. {' '.join(words)}\nQuestion: Do not provide any explanation. Please ignore the dots "
            "'....'. What are the three most frequently appeared words in the above coded text?"
        )
        prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
        return Prompt(task, prefix, vocab[1:4])


TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("book", "words", "numbers"),
    "niah_single_3": Niah("book", "words", "uuids"),
    "niah_multikey_1": Niah("book", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("book", "words", "numbers", values=4),
    "niah_multiquery": Niah("book", "words", "numbers", queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}


# -- prompts ----------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def zeta(s: float, terms: int = 10_000) -> float:
    """Riemann zeta(s), s > 1: the sum of the first terms plus the Euler-Maclaurin tail."""
    head = math.fsum(k**-s for k in range(1, terms))
    return head + terms ** (1 - s) / (s - 1) + terms**-s / 2


def render(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The prompt's token ids: chat turns through the tokenizer's chat template, then the
    answer prefix; plain text where the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            m
            for user, answer in prompt.turns
            for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
        ]
        messages.append({"role": "user", "content": prompt.task})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text + prompt.answer_prefix, add_special_tokens=False)["input_ids"]
    text = "".join(f"{user}\n{answer}\n\n" for user, answer in prompt.turns) + prompt.task + prompt.answer_prefix
    return tokenizer(text)["input_ids"]


def fit(task: Task, tokenizer: PreTrainedTokenizerBase, length: int, key: str, sources: Sources) -> tuple[list[int], Prompt, int]:
    """The prompt of `task` with the largest haystack whose tokens plus the task's tokens to
    generate fit in `length` -> (ids, prompt, haystack units). Every try draws from a fresh
    random.Random(key), so a prompt depends only on the key and its size."""

    def build(units: int) -> tuple[list[int], Prompt]:
        prompt = task.make(units, random.Random(key), sources, length)
        return render(tokenizer, prompt), prompt

    budget = length - task.tokens_to_generate
    low = task.min_units
    ids, prompt = build(low)
    check_room(task, length, len(ids))
    high, most = low, task.max_units(sources)
    while high < most and len(build(min(2 * high, most))[0]) <= budget:  # double until too long, then bisect
        high = min(2 * high, most)
    best, high = (high, build(high)), min(2 * high, most) - 1 if high < most else high
    low = best[0] + 1
    while low <= high:
        middle = (low + high) // 2
        found = build(middle)
        if len(found[0]) <= budget:
            best, low = (middle, found), middle + 1
        else:
            high = middle - 1
    units, (ids, prompt) = best
    return ids, prompt, units


def check_room(task: Task, length: int, smallest: int) -> None:
    """A clear error when the task's smallest prompt (`smallest` tokens) and its answer exceed `length`."""
    if smallest + task.tokens_to_generate > length:
        name = next((n for n, t in TASKS.items() if t == task), "this task")
        raise ValueError(
            f"length {length} is too short for {name}: its smallest prompt has {smallest} tokens, "
            f"plus {task.tokens_to_generate} to generate."
        )


def score(output: str, expected: list[str]) -> float:
    """RULER's string_match_all for one answer: the share of expected strings it contains."""
    answer = re.sub(r"[\x00-\x1f]", "\n", output.strip()).strip().lower()
    return sum(e.lower() in answer for e in expected) / len(expected)


# -- the grid ---------------------------------------------------------------------------


def substitutions(document: str) -> list[str]:
    return [s.format(document=document, wonderwords=importlib.metadata.version("wonderwords")) for s in SUBSTITUTIONS]


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {', '.join(TASKS)} (qa_1 and qa_2 need data not here).")


def run_ruler(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[Method],
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int,
    sources: Sources,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every (method, task, length, sample) cell not already in `out_json`; the JSON is rewritten after each."""
    check_tasks(tasks)
    methods = resolve_all(methods, model)
    store = RunStore(out_json, {"task": "ruler", "seed": seed, "document": sources.document})
    store.report.update({"training_length": training_length(model.config), **(meta or {})})
    store.report["substitutions"] = substitutions(sources.document)
    store.record_methods(methods)
    for task, length in ((t, n) for t in tasks for n in lengths):  # a length too short fails now, not hours in
        smallest = TASKS[task].make(TASKS[task].min_units, random.Random(0), sources, length)
        check_room(TASKS[task], length, len(render(tokenizer, smallest)))
    stop = {i for i in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    todo = [(m, t, n, s) for m in methods for n in lengths for t in tasks for s in range(samples)]
    bar = tqdm(todo, desc="ruler", unit="prompt", disable=not progress)
    for method, task, length, sample in bar:
        bar.set_postfix_str(f"{method.name} {task} {length}")
        compute = functools.partial(_cell, model, tokenizer, method, task, length, sample, seed, sources, stop)
        store.cell(f"{method.name}/{task}/{length}/{sample}", compute)
    return store.report


def _cell(model, tokenizer, method: Method, task: str, length: int, sample: int, seed: int, sources: Sources, stop) -> dict:
    ids, prompt, units = fit(TASKS[task], tokenizer, length, f"{seed}/{task}/{length}/{sample}", sources)
    start = time.perf_counter()
    measured: dict = {}
    tokens = method.complete(model, torch.tensor([ids], device=model.device), TASKS[task].tokens_to_generate, measured, stop)
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    return {
        "method": method.name,
        "task": task,
        "length": length,
        "sample": sample,
        "prompt_tokens": len(ids),
        "haystack_units": units,
        "expected": prompt.outputs,
        "output": output,
        "score": score(output, prompt.outputs),
        "seconds": round(time.perf_counter() - start, 2),
        **conditions(),
        **measured,
    }


def scores(report: dict) -> dict[str, dict[tuple[str, int], float]]:
    """{method: {(task, length): mean score x100}}, tasks in RULER's order."""
    tally: dict[str, dict[tuple[str, int], list[float]]] = {}
    for cell in report["results"].values():
        tally.setdefault(cell["method"], {}).setdefault((cell["task"], cell["length"]), []).append(cell["score"])
    order = {t: i for i, t in enumerate(TASKS)}
    return {
        m: {k: 100 * sum(v) / len(v) for k, v in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1]))}
        for m, cells in tally.items()
    }
