"""Every registered strategy with the settings the tests run it at: a new strategy adds its line here.

Small windows, so that the tiny test models (64 positions) go several windows past them.
"""

from __future__ import annotations

from lminf.strategies import LMInfinite, Sinks

CASES = {
    "lminf": LMInfinite(n_global=3, n_local=8),
    "lminf-top2": LMInfinite(n_global=3, n_local=8, top_k=2, top_k_from_layer=1),
    "sinks": Sinks(n_global=3, n_local=8),
}
