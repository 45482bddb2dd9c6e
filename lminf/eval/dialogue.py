"""Dialogue memory: SirLLM's two synthetic multi-turn tasks, written here (the authors' data
is not ours to ship), played as the released evaluation loop plays them.

- Grocery Shopping: a key turn ("I want you to buy the GROCERY: X", answer "OK"), then
  general-knowledge distractor questions, then the recall question "Which one is the GROCERY
  that I want you to buy earlier?" with four choices, the key among them once. Metric: key
  recall accuracy (and distractor accuracy). Each episode starts from an empty cache.
- Rock-Paper-Scissors: the user throws one dominant option half the time; each round the
  model is told the user's previous throw and picks its own. Metrics: win, tie, lose rates.

Every turn is multiple choice, in the released loop's "USER: ... ASSISTANT: " format: the
turn is announced (lminf.begin_turn: SirLLM evicts and decays there), then each choice is run
as one forward, context and choice together, on a copy of the cache; the chosen choice's copy
is kept, so the model's own answers enter its memory. The choice: the first whose greedy
prediction reproduces it, else the highest log-probability of its first token (Rock-Paper-
Scissors: always the latter, as the released loop does). Runs are resumable (lminf.eval.runs).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from lminf.caches.turn_cache import begin_turn
from lminf.eval.methods import Method, Patched, Vanilla, resolve_all
from lminf.eval.runs import RunStore, conditions
from lminf.generation import cache_kwarg
from lminf.strategies.infllm import InfLLM
from lminf.strategies.longheads import LongHeads
from lminf.strategies.sirllm import SirLLM
from lminf.strategies.windowed import WindowedStrategy

GROCERIES = [
    "apples", "bananas", "carrots", "onions", "potatoes", "tomatoes", "lettuce", "spinach", "broccoli", "garlic",
    "lemons", "oranges", "grapes", "cherries", "peaches", "pears", "mushrooms", "cucumbers", "peppers", "celery",
    "rice", "pasta", "flour", "sugar", "salt", "butter", "cheese", "yogurt", "milk", "eggs",
    "bread", "honey", "coffee", "tea", "oats", "beans", "lentils", "chicken", "salmon", "tofu",
]  # fmt: skip

# (question, correct answer, three wrong answers): short general knowledge, written for this task.
QUESTIONS = [
    ("What do bees make?", "honey", "milk", "silk", "wax paper"),
    ("Which planet do we live on?", "Earth", "Mars", "Venus", "Jupiter"),
    ("What color is the sky on a clear day?", "blue", "green", "red", "brown"),
    ("How many legs does a spider have?", "eight", "six", "four", "ten"),
    ("What do you use to write on a blackboard?", "chalk", "a spoon", "a shoe", "soap"),
    ("Where do fish live?", "in water", "in trees", "in the sand", "in the sky"),
    ("What is frozen water called?", "ice", "steam", "smoke", "sand"),
    ("Which animal says moo?", "a cow", "a cat", "a dog", "a duck"),
    ("What do you wear on your feet?", "shoes", "hats", "gloves", "scarves"),
    ("How many days are in a week?", "seven", "five", "ten", "twelve"),
    ("What gives light during the day?", "the sun", "the moon", "a candle", "a lamp"),
    ("Which season is the coldest?", "winter", "summer", "spring", "autumn"),
    ("What do you use to cut paper?", "scissors", "a spoon", "a pillow", "a cup"),
    ("Where do you keep food cold?", "in a fridge", "in an oven", "in a closet", "in a bag"),
    ("What do plants need to grow?", "sunlight", "plastic", "music", "metal"),
    ("Which bird is a symbol of peace?", "a dove", "a crow", "an owl", "a hawk"),
    ("What is the opposite of hot?", "cold", "tall", "fast", "loud"),
    ("What do you call a baby dog?", "a puppy", "a kitten", "a calf", "a chick"),
    ("Which instrument has black and white keys?", "a piano", "a drum", "a flute", "a guitar"),
    ("What falls from clouds when it rains?", "water", "sand", "leaves", "stones"),
    ("Where does a teacher work?", "at a school", "at a farm", "at a mine", "at sea"),
    ("What do you drink when you are thirsty?", "water", "sand", "oil", "glue"),
    ("Which shape has three sides?", "a triangle", "a square", "a circle", "a hexagon"),
    ("What do you use to see?", "your eyes", "your ears", "your nose", "your hands"),
    ("Which animal has a long trunk?", "an elephant", "a horse", "a rabbit", "a lion"),
    ("What do you sleep on?", "a bed", "a table", "a stove", "a sink"),
    ("How many hours are in a day?", "twenty-four", "twelve", "ten", "sixty"),
    ("What is the color of grass?", "green", "purple", "white", "orange"),
    ("Which fruit is yellow and long?", "a banana", "a cherry", "a grape", "a plum"),
    ("Where do you go to borrow books?", "a library", "a bakery", "a garage", "a pool"),
    ("What do firefighters put out?", "fires", "lights", "letters", "songs"),
    ("Which month comes after January?", "February", "March", "December", "June"),
    ("What do cows give us to drink?", "milk", "juice", "coffee", "tea"),
    ("What do you use to unlock a door?", "a key", "a fork", "a coin", "a brush"),
    ("Which animal can fly?", "a bird", "a fish", "a snake", "a worm"),
    ("What do you hear with?", "your ears", "your eyes", "your feet", "your teeth"),
    ("What is the largest ocean?", "the Pacific", "the Arctic", "the Indian", "the Atlantic"),
    ("Which vehicle runs on rails?", "a train", "a boat", "a bicycle", "a plane"),
    ("What do you brush every morning?", "your teeth", "your shoes", "your car", "your book"),
    ("Which is a vegetable?", "a carrot", "a stone", "a spoon", "a shirt"),
]

THROWS = ("rock", "paper", "scissors")
BEATS = {"rock": "scissors", "paper": "rock", "scissors": "paper"}  # each throw beats the one it names


@dataclass(frozen=True)
class Turn:
    """One multiple-choice turn: the user's text, the choices, and the correct one's index
    (None where nothing is graded)."""

    kind: str  # "key", "distractor", "recall" or "round"
    question: str
    choices: tuple[str, ...]
    answer: int | None


def grocery_episode(rng: random.Random, distractors: int) -> list[Turn]:
    """The key turn, `distractors` questions (each its own, options shuffled), the recall question."""
    if not 0 <= distractors <= len(QUESTIONS):
        raise ValueError(f"distractors must be in 0..{len(QUESTIONS)}, got {distractors}.")
    key, *others = rng.sample(GROCERIES, 4)
    turns = [Turn("key", f"I want you to buy the GROCERY: {key}", ("OK",), None)]
    for question, *options in rng.sample(QUESTIONS, distractors):
        turns.append(_multiple_choice("distractor", question, options[0], options[1:], rng))
    turns.append(_multiple_choice("recall", "Which one is the GROCERY that I want you to buy earlier?", key, others, rng))
    return turns


def _multiple_choice(kind: str, question: str, right: str, wrong: list[str], rng: random.Random) -> Turn:
    options = [right, *wrong]
    rng.shuffle(options)
    listed = " ".join(f"({'ABCD'[i]}) {option}" for i, option in enumerate(options))
    return Turn(kind, f"{question} Choices: {listed}", tuple(options), options.index(right))


def rps_throws(rng: random.Random, dominant: str, rounds: int) -> list[str]:
    """The user's throws: `dominant` in exactly half of the rounds (rounded down), the others at random, shuffled."""
    if dominant not in THROWS:
        raise ValueError(f"dominant must be one of {THROWS}, got {dominant!r}.")
    rest = [t for t in THROWS if t != dominant]
    throws = [dominant] * (rounds // 2) + [rng.choice(rest) for _ in range(rounds - rounds // 2)]
    rng.shuffle(throws)
    return throws


def rps_turn(previous: str | None) -> Turn:
    """A round's question (the released loop's wording); the choices are the throws."""
    if previous is None:
        question = "Let's play a game of Rock-Paper-Scissors. Choose one option from: (A) rock (B) paper (C) scissors."
    else:
        question = (
            f"I chose [{previous}]. Analyze my preferences to maximize your winning rate and proceed to the next round. "
            "Choices: (A) rock (B) paper (C) scissors. You choose:"
        )
    return Turn("round", question, THROWS, None)


def encode(tokenizer: PreTrainedTokenizerBase, turn: Turn) -> tuple[list[list[int]], int]:
    """(ids of context + choice for each choice, tokens of the context), as the released loop
    encodes a pair: the context's trailing space moves to the front of the choice."""
    context = f"USER: {turn.question}\n\nASSISTANT:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    rows = []
    for choice in turn.choices:
        whole = tokenizer(f"{context} {choice}", add_special_tokens=False)["input_ids"]
        if whole[: len(context_ids)] != context_ids or len(whole) == len(context_ids):
            raise ValueError(f"the choice {choice!r} does not tokenize apart from its context.")
        rows.append(whole)
    return rows, len(context_ids)


def continuation_scores(logits: torch.Tensor, ids: list[int], context: int) -> tuple[float, bool]:
    """(log-probability of the choice's first token, whether the greedy prediction at every
    choice position is the choice's token) from one forward's logits (n, vocab) over `ids`."""
    logp = logits[context - 1 : len(ids) - 1].float().log_softmax(-1)
    target = torch.tensor(ids[context:], device=logits.device)
    return float(logp[0, target[0]]), bool((logp.argmax(-1) == target).all())


def choose(first_logprobs: list[float], matches: list[bool], greedy: bool = True) -> int:
    """The released rule: the first choice its greedy decode reproduces, else (or with
    greedy=False) the highest first-token log-probability, the first on ties."""
    if greedy and True in matches:
        return matches.index(True)
    return first_logprobs.index(max(first_logprobs))


@torch.inference_mode()
def play(model: PreTrainedModel, cache: Cache, rows: list[list[int]], context: int, greedy: bool = True) -> tuple[int, Cache]:
    """One turn on `cache`: announced once (room for its longest choice), then each choice run
    on its own copy -> (the chosen index, the chosen copy)."""
    begin_turn(cache, max(len(row) for row in rows))
    copies, firsts, matches = [], [], []
    for row in rows:
        copied = copy.deepcopy(cache)
        logits = model(torch.tensor([row], device=model.device), **cache_kwarg(model, copied), use_cache=True).logits[0]
        first, match = continuation_scores(logits, row, context)
        copies.append(copied)
        firsts.append(first)
        matches.append(match)
    chosen = choose(firsts, matches, greedy)
    return chosen, copies[chosen]


def grocery_cell(model, tokenizer, method: Method, episode: int, distractors: int, seed: int) -> dict:
    turns = grocery_episode(random.Random(f"{seed}/grocery/{episode}"), distractors)
    start = time.perf_counter()
    with method.patched(model):
        cache, picks, tokens = method.new_cache(model), [], 0
        for turn in turns:
            rows, context = encode(tokenizer, turn)
            chosen, cache = play(model, cache, rows, context)
            picks.append(chosen)
            tokens += len(rows[chosen])
    graded = [(t, p) for t, p in zip(turns, picks, strict=True) if t.kind == "distractor"]
    recall = turns[-1]
    return {
        "method": method.name,
        "episode": episode,
        "key": recall.choices[recall.answer],
        "picked": recall.choices[picks[-1]],
        "key_correct": picks[-1] == recall.answer,
        "distractors": len(graded),
        "distractors_correct": sum(t.answer == p for t, p in graded),
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 2),
        **conditions(),
    }


def rps_cell(model, tokenizer, method: Method, dominant: str, rounds: int, seed: int) -> dict:
    throws = rps_throws(random.Random(f"{seed}/rps/{dominant}"), dominant, rounds)
    start = time.perf_counter()
    tally = {"win": 0, "tie": 0, "lose": 0}
    with method.patched(model):
        cache, previous, tokens = method.new_cache(model), None, 0
        for throw in throws:
            turn = rps_turn(previous)
            rows, context = encode(tokenizer, turn)
            chosen, cache = play(model, cache, rows, context, greedy=False)
            tokens += len(rows[chosen])
            mine = THROWS[chosen]
            tally["tie" if mine == throw else "win" if BEATS[mine] == throw else "lose"] += 1
            previous = throw
    return {
        "method": method.name,
        "dominant": dominant,
        "rounds": rounds,
        **tally,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 2),
        **conditions(),
    }


def within(method: Method, tokens: int) -> Method:
    """`method` with a cache of `tokens`, so that methods compare at one size: its first tokens
    (at most tokens / 8) and a window of the rest (sirllm: half scored, half recent; longheads:
    `tokens` read in chunks of tokens / 8). What a method reads beyond that (top-k picks,
    InfLLM's memory blocks, of tokens / 8 each) it keeps. Vanilla keeps everything: the control."""
    if isinstance(method, Vanilla):
        return method
    strategy = getattr(method, "strategy", None)
    if not isinstance(method, Patched) or strategy is None:
        raise NotImplementedError(f"{method.name} runs one prompt, not a dialogue of turns on a cache.")
    if isinstance(strategy, LongHeads):
        sized = dataclasses.replace(strategy, chunk_tokens=tokens // 8, attention_length=tokens, select_from=tokens)
    elif isinstance(strategy, SirLLM):
        strategy = dataclasses.replace(strategy, n_global=min(strategy.n_global, tokens // 8))
        room = tokens - strategy.n_global
        sized = dataclasses.replace(strategy, n_scored=room - room // 2, n_local=room // 2)
    elif isinstance(strategy, WindowedStrategy):
        n_global = min(strategy.n_global, tokens // 8)
        blocks = {"block_size": min(strategy.block_size, tokens // 8)} if isinstance(strategy, InfLLM) else {}
        sized = dataclasses.replace(strategy, n_global=n_global, n_local=tokens - n_global, **blocks)
    else:
        raise NotImplementedError(f"{method.name}: no rule to size it to a {tokens}-token cache.")
    return dataclasses.replace(method, strategy=sized)


def run_dialogue(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[Method],
    episodes: int,
    distractors: int,
    rounds: int,
    seed: int,
    out_json: Path,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Every grocery episode and Rock-Paper-Scissors player (one per dominant throw) of every
    method not already in `out_json`; the JSON is rewritten after each."""
    methods = resolve_all(methods, model)
    identity = {"task": "dialogue", "seed": seed, "distractors": distractors, "rounds": rounds}
    store = RunStore(out_json, identity)
    store.report.update(meta or {})
    store.record_methods(methods)
    # Episode by episode, every method on each: a run stopped early still compares like with like.
    todo = [("grocery", m, e) for e in range(episodes) for m in methods]
    todo += [("rps", m, d) for d in THROWS if rounds for m in methods]
    bar = tqdm(todo, desc="dialogue", unit="episode", disable=not progress)
    for task, method, which in bar:
        bar.set_postfix_str(f"{method.name} {task} {which}")
        if task == "grocery":
            compute = functools.partial(grocery_cell, model, tokenizer, method, which, distractors, seed)
        else:
            compute = functools.partial(rps_cell, model, tokenizer, method, which, rounds, seed)
        store.cell(f"{task}/{method.name}/{which}", compute)
    return store.report


def summary(report: dict) -> dict[str, dict[str, float]]:
    """{method: key recall, distractor accuracy, episodes, win/tie/lose rates, rounds}"""
    out: dict[str, dict[str, float]] = {}
    for key, cell in report["results"].items():
        row = out.setdefault(cell["method"], {})
        if key.startswith("grocery/"):
            counts = {"episodes": 1, **{f: cell[f] for f in ("key_correct", "distractors", "distractors_correct")}}
        else:
            counts = {f: cell[f] for f in ("rounds", "win", "tie", "lose")}
        for field, value in counts.items():
            row[field] = row.get(field, 0) + value
    for row in out.values():
        if row.get("episodes"):
            row["key_recall"] = row.pop("key_correct") / row["episodes"]
            graded, right = row.pop("distractors"), row.pop("distractors_correct")
            row["distractor_accuracy"] = right / graded if graded else None
        if row.get("rounds"):
            for field in ("win", "tie", "lose"):
                row[f"{field}_rate"] = row.pop(field) / row["rounds"]
    return out


def dialogue_table(report: dict) -> str:
    """A markdown table of `summary`."""
    lines = [
        "| method | grocery key recall | distractor accuracy | episodes | RPS win | tie | lose | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary(report).items():
        grocery, rps = ("",) * 3, ("",) * 4
        if "episodes" in row:
            grocery = (f"{row['key_recall']:.2f}", _rate(row["distractor_accuracy"]), f"{row['episodes']}")
        if "rounds" in row:
            rps = (*(f"{row[f]:.3f}" for f in ("win_rate", "tie_rate", "lose_rate")), f"{row['rounds']}")
        lines.append("| " + " | ".join((name, *grocery, *rps)) + " |")
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
