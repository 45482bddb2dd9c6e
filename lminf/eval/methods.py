"""The methods an evaluation compares, and the registry of their names.

A method has a `name` (its key in results), `settings()` (what the JSON records about it),
`resolved(model)` (the same method with the defaults that depend on the model filled in),
`nll(model, ids)` (per-token NLL, one pass) and `complete(model, ids, max_new_tokens)`
(greedy continuation). Two kinds:

- baselines, which are not strategies of the engine: `Vanilla` (the unpatched model, fed
  through a DynamicCache in chunks) and `Window` (the plain baseline, recomputed: tokens are
  scored `stride` at a time by the vanilla model reading only the last `n_local` tokens, so
  each token sees between n_local - stride and n_local - 1 previous tokens and nothing older);
- `Patched(strategy, name)`: the model patched with a registered strategy, one pass through
  the strategy's cache (exactly the one-pass result), unpatched afterwards;
- `SegmentWise(procedure)`: a procedure around the plain model (lminf.procedures: XL3M), which
  answers the question that ends a prompt from segments it picks for that question. It
  completes prompts (passkey, needle, RULER) but has no per-token NLL and no cache to
  benchmark, so `lminf eval ppl`, `stream` and `bench` refuse it by name.

Method names: "vanilla", "window", and every name in each registered strategy's
`methods()` (LM-Infinite offers "lminf" and "lminf-topk", sinks "sinks"), so a new strategy
reaches `lminf eval`, `lminf bench` and the report without an edit here; and "xl3m", offered
where a method only completes prompts and left out of the default lists (it runs the model
once per segment).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from lminf.arguments import procedure_from, strategy_from
from lminf.families import training_length
from lminf.generation import check_ids, greedy, target_nll, token_nll
from lminf.memory import cache_tiers
from lminf.patching import make_cache, patch, settings_of, unpatch
from lminf.procedures import XL3M
from lminf.strategies import STRATEGIES, Strategy, build


class Method:
    """Base class: the unpatched model. Subclasses change what they need."""

    name = ""

    def settings(self) -> dict:
        return {}

    def resolved(self, model: PreTrainedModel) -> Method:
        return self

    @contextmanager
    def patched(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        """The model as this method runs it, for the duration of the block."""
        yield model

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return DynamicCache()

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        """Query-key pairs one layer attends to over a causal prompt of `length` tokens: all of them."""
        return length * (length + 1) // 2

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        with self.patched(model):
            return token_nll(model, ids, self.new_cache(model), progress=progress)

    def complete(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        max_new_tokens: int,
        measured: dict | None = None,
        stop: Collection[int] = (),
    ) -> list[int]:
        """Greedy continuation, ended after a token in `stop` or `max_new_tokens`; `measured` (if
        given) gets the cache's memory at its fullest (cache_tiers)."""
        with self.patched(model):
            cache = self.new_cache(model)
            out = greedy(model, ids, cache, max_new_tokens, stop=stop)
            if measured is not None:
                measured.update(cache_tiers(cache))
            return out


class Vanilla(Method):
    name = "vanilla"


@dataclass(frozen=True)
class Window(Method):
    n_local: int | None = None  # default: the model's training length
    stride: int | None = None  # default: n_local // 4

    name = "window"

    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, model: PreTrainedModel) -> Window:
        window = self.n_local or training_length(model.config)
        stride = self.stride or max(1, window // 4)
        if not 1 <= stride < window:
            raise ValueError(f"window stride must be in 1..{window - 1}, got {stride}.")
        return Window(window, stride)

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        raise NotImplementedError("the recomputed window has no cache to benchmark.")

    @torch.inference_mode()
    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        check_ids(ids)
        resolved = self.resolved(model)
        window, stride = resolved.n_local, resolved.stride
        n, nll = ids.shape[1], []
        for a in tqdm(range(1, n, stride), desc="window", unit="step", disable=not progress):
            b = min(a + stride, n)  # score targets a .. b-1
            start = max(0, b - window)  # the last target reads window - 1 tokens before it
            hidden = model.get_decoder()(ids[:, start : b - 1], use_cache=False).last_hidden_state
            nll.append(target_nll(model, hidden[0, a - 1 - start :], ids[0, a:b]))
        return torch.cat(nll)

    def complete(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        max_new_tokens: int,
        measured: dict | None = None,
        stop: Collection[int] = (),
    ) -> list[int]:
        window = self.n_local or training_length(model.config)
        if max_new_tokens >= window:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for input in a window of {window}.")
        # The prompt is cut so that the last generated token still sees only `window` tokens.
        cache = DynamicCache()
        out = greedy(model, ids[:, -(window - max_new_tokens) :], cache, max_new_tokens, stop=stop)
        if measured is not None:
            measured.update(cache_tiers(cache))
        return out


@dataclass(frozen=True)
class Patched(Method):
    """The model patched with `strategy` (a Strategy or a registered name) while it runs;
    `name` defaults to the strategy's name."""

    strategy: Strategy
    name: str = ""
    kv_dtype: str | None = None  # e.g. "bfloat16": the cache stores keys and values so (lminf.patch); None: the model's
    kernel: str = "auto"  # lminf.patch's backend, one of lminf.kernels.sdpa.KERNELS

    def __post_init__(self) -> None:
        if isinstance(self.strategy, str):
            object.__setattr__(self, "strategy", build(self.strategy))
        if not self.name:
            object.__setattr__(self, "name", self.strategy.name)

    def settings(self) -> dict:
        extra = {"kv_dtype": self.kv_dtype} if self.kv_dtype else {}
        return {**self.strategy.settings(), **extra, **({"kernel": self.kernel} if self.kernel != "auto" else {})}

    def resolved(self, model: PreTrainedModel) -> Patched:
        with self.patched(model):
            return dataclasses.replace(self, strategy=settings_of(model))

    @contextmanager
    def patched(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        patch(model, self.strategy, backend=self.kernel, kv_dtype=getattr(torch, self.kv_dtype) if self.kv_dtype else None)
        try:
            yield model
        finally:
            unpatch(model)

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return make_cache(model)

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        return self.strategy.kept_pairs(length, layer)


@dataclass(frozen=True)
class SegmentWise(Method):
    """XL3M run on the plain model: each prompt's answer comes from the segments it picks."""

    procedure: XL3M = XL3M()

    name = XL3M.name

    def settings(self) -> dict:
        return self.procedure.settings()

    def resolved(self, model: PreTrainedModel) -> SegmentWise:
        return SegmentWise(self.procedure.resolved(model.config))

    def kept_pairs(self, length: int, layer: int = 0) -> int:
        raise NotImplementedError(NOT_SCORED.format(name=self.name))

    def nll(self, model: PreTrainedModel, ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
        raise NotImplementedError(NOT_SCORED.format(name=self.name))

    def complete(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        max_new_tokens: int,
        measured: dict | None = None,
        stop: Collection[int] = (),
    ) -> list[int]:
        """Greedy answer from the key context; `measured` gets what was chosen (Selection.summary)."""
        tokens, selection = self.procedure.generate(model, ids, max_new_tokens, stop=stop, progress=False)
        if measured is not None:
            measured.update(selection.summary())
        return tokens


NOT_SCORED = (
    "{name} picks segments for the question that ends a prompt, so it has no per-token NLL and no cache "
    "to benchmark: run it in lminf eval passkey, needle or ruler."
)


# -- the registry of names ---------------------------------------------------------------

BASELINES: dict[str, type[Method]] = {Vanilla.name: Vanilla, Window.name: Window}
PROCEDURES: dict[str, type[Method]] = {SegmentWise.name: SegmentWise}


def strategy_methods() -> dict[str, tuple[type[Strategy], dict]]:
    """Every registered strategy's methods: name -> (strategy class, settings fixed for it)."""
    return {name: (cls, preset) for cls in STRATEGIES.values() for name, preset in cls.methods().items()}


def method_names(vanilla: bool = True, window: bool = True, procedures: bool = False) -> list[str]:
    """The names the CLI offers: vanilla, every strategy method, window; then, with `procedures`, xl3m."""
    return [*([Vanilla.name] * vanilla), *strategy_methods(), *([Window.name] * window), *(list(PROCEDURES) * procedures)]


def make_method(name: str, args: argparse.Namespace) -> Method:
    """The method `name` with the strategy settings given on the command line (`args`, as
    lminf.arguments.add_model_args makes them; a strategy ignores the settings it lacks)."""
    if name == Vanilla.name:
        return Vanilla()
    if name == Window.name:
        return Window(getattr(args, "n_local", None))
    if name == SegmentWise.name:
        return SegmentWise(procedure_from(args))
    if name not in strategy_methods():
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}.")
    cls, preset = strategy_methods()[name]
    strategy = strategy_from(args, cls.name, strict=False, fixed=preset)
    # A preset that leaves a setting to the flags must not fall onto one that fixes it
    # (lminf-topk with --top-k 0 is plain lminf under another name).
    for other, other_preset in cls.methods().items():
        if len(other_preset) > len(preset) and strategy_from(args, cls.name, strict=False, fixed=other_preset) == strategy:
            raise ValueError(f"method {name} is the same as {other} with these settings ({strategy}); change a setting.")
    return Patched(strategy, name, getattr(args, "kv_dtype", None), getattr(args, "kernel", "auto"))


def methods_from(text: str, args: argparse.Namespace, allowed: Sequence[str] | None = None) -> list[Method]:
    """The methods of a comma list (`--methods`), each built by `make_method`."""
    allowed = list(allowed or method_names())
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in allowed]
    for name in set(unknown) & set(PROCEDURES):
        raise ValueError(NOT_SCORED.format(name=name))
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(allowed)}.")
    methods = [make_method(name, args) for name in names]
    check_distinct(methods)
    return methods


def check_distinct(methods: Sequence[Method]) -> None:
    """One run holds each method once: no name twice, no two methods with identical settings."""
    names: dict[str, Method] = {}
    settings: dict[str, str] = {}
    for method in methods:
        if method.name in names:
            raise ValueError(f"method {method.name} is asked for twice.")
        names[method.name] = method
        key = json.dumps(method.settings(), sort_keys=True, default=str)
        if key in settings:
            raise ValueError(
                f"methods {settings[key]} and {method.name} have identical settings {method.settings()}: "
                "they would measure the same thing twice; drop one or change a setting (e.g. --top-k)."
            )
        settings[key] = method.name


def resolve_all(methods: Sequence[Method], model: PreTrainedModel) -> list[Method]:
    """Each method resolved against `model`, checked to be distinct (what a runner records)."""
    resolved = [method.resolved(model) for method in methods]
    check_distinct(resolved)
    return resolved


def strategy_of(name: str, settings: dict | None = None) -> str | None:
    """The strategy a recorded method ran (its settings name it), or None for a baseline."""
    return (settings or {}).get("strategy")
