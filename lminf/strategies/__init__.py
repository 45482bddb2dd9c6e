"""Training-free long-context strategies, one file each, registered by name.

    lminf.patch(model, "sinks", n_local=1024)    # by name, or
    lminf.patch(model, lminf.LMInfinite(n_global=10, top_k=5))

Every module of this package is imported here, so `@register` in a new file is all it
takes for patch, the CLI (`--strategy`), `lminf eval` and `lminf bench` to know it.
"""

import importlib
import pkgutil

from lminf.strategies import lm_infinite, sinks  # noqa: E402, F401  (first: the order the CLI lists them in)
from lminf.strategies.base import STRATEGIES, AttentionCall, Rule, Strategy, build, get, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from lminf.strategies.infllm import InfLLM  # noqa: E402  (re-exported for users)
from lminf.strategies.lm_infinite import LMInfinite  # noqa: E402
from lminf.strategies.sinks import Sinks  # noqa: E402

__all__ = ["STRATEGIES", "AttentionCall", "InfLLM", "LMInfinite", "Rule", "Sinks", "Strategy", "build", "get", "register"]
