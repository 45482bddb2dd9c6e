"""Every registered strategy with the settings the tests run it at: a new strategy adds its line here.

Small windows, so that the tiny test models (64 positions) go several windows past them.
"""

from __future__ import annotations

from lminf.strategies import LMInfinite, Sinks
from lminf.strategies.infllm import InfLLM
from lminf.strategies.lm_infinite_original import LMInfiniteOriginal

CASES = {
    # blocks of 4 from position 3, in memory from position 14 on; 2 of them per query, 2 hot
    "infllm": InfLLM(n_global=3, n_local=8, block_size=4, top_blocks=2, repr_topk=2, hot_blocks=2),
    "lminf": LMInfinite(n_global=3, n_local=8),
    "lminf-top2": LMInfinite(n_global=3, n_local=8, top_k=2, top_k_from_layer=1),
    "sinks": Sinks(n_global=3, n_local=8),
    "lminf-original": LMInfiniteOriginal(n_global=3, n_local=8, top_k=2, top_k_from_layer=1, top_k_insert_at=5),
}
