"""Serving and evaluation need packages that `patch` and `generate` do not: pip extras (pyproject.toml)."""

from __future__ import annotations

import importlib
from types import ModuleType

SERVE = "lminf serve needs FastAPI and uvicorn"
PLOTS = "lminf's evaluations and benchmark draw their plots with matplotlib"
RULER = "lminf eval ruler needs wonderwords (RULER's word lists)"
LM_EVAL = "lminf lm-eval needs EleutherAI's lm-evaluation-harness"
RDATA = "reading Jane Austen's novels out of R's data files needs rdata"


class MissingExtra(ImportError):
    """An optional dependency is absent; the message names the extra that brings it."""


def hint(needs: str, extra: str) -> str:
    return f"{needs}: pip install 'lminf[{extra}]'"


def require(module: str, needs: str, extra: str) -> ModuleType:
    """Import `module`, or raise MissingExtra saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(hint(needs, extra)) from error
