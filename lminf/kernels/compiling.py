"""torch.compile for kernel "compiled", with one fall-back for the whole process.

Why one: where a graph cannot compile (no C++ compiler, for one), none will; so the first
failure is said once and every compiled function of the decoding step runs its plain
version from then on (lminf.kernels.one_query, lminf.kernels.decode_layers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

_failed: str | None = None  # why compiling failed in this process, once it did
_graphs: dict[Callable, Callable] = {}  # function -> its torch.compile, built on first call


def compiles() -> bool:
    """False once a compiled function failed to compile in this process."""
    return _failed is None


def compiled(function: Callable, dynamic: bool) -> Callable:
    """`function` through torch.compile, built on first call; once compiling failed anywhere,
    `function` itself (warned once, where it failed)."""

    def run(*args):
        global _failed
        if _failed is not None:
            return function(*args)
        if function not in _graphs:
            _graphs[function] = torch.compile(function, dynamic=dynamic)
        try:
            return _graphs[function](*args)
        except Exception as error:  # torch.compile's failures have no common type
            _failed = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"kernel 'compiled' cannot compile here ({_failed}); decoding with the plain kernels instead.",
                stacklevel=2,
            )
            return function(*args)

    run.__wrapped__ = function
    return run
