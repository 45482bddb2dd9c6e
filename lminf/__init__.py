"""lminf: LM-Infinite (Lambda-shaped attention) and its relatives for Hugging Face rotary-position models.

import lminf
model, tokenizer = lminf.load_default()     # or any transformers causal LM
lminf.patch(model, n_global=10, n_local=8192)   # LM-Infinite; or lminf.patch(model, "sinks", ...)
model.generate(...)                          # bounded cache, any input length
"""

from lminf.caches import LambdaCache, begin_turn
from lminf.default_model import load_default, load_model
from lminf.families import SUPPORTED_MODEL_TYPES
from lminf.generation import prefill
from lminf.patching import make_cache, patch, settings_of, unpatch
from lminf.procedures import XL3M
from lminf.strategies import STRATEGIES, InfLLM, LMInfinite, Sinks, Strategy
from lminf.weights.linear_layout import arrange_linear_weights

__all__ = [
    "STRATEGIES",
    "SUPPORTED_MODEL_TYPES",
    "InfLLM",
    "LMInfinite",
    "LambdaCache",
    "Sinks",
    "Strategy",
    "XL3M",
    "arrange_linear_weights",
    "begin_turn",
    "load_default",
    "load_model",
    "make_cache",
    "patch",
    "prefill",
    "settings_of",
    "unpatch",
]
