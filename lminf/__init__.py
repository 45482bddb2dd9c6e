"""lminf: LM-Infinite (Lambda-shaped attention) for Hugging Face rotary-position models.

import lminf
model, tokenizer = lminf.load_default()     # or any transformers causal LM
lminf.patch(model, n_global=10, n_local=8192)
model.generate(...)                          # bounded cache, any input length
"""

from lminf.caches.lambda_cache import LambdaCache
from lminf.default_model import load_default, load_model
from lminf.patching import SUPPORTED_MODEL_TYPES, make_cache, patch, prefill, settings_of, unpatch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LambdaCache",
    "load_default",
    "load_model",
    "make_cache",
    "patch",
    "prefill",
    "settings_of",
    "unpatch",
]
