"""A decoding step for Llama-shaped models that skips transformers' per-layer machinery
(lminf.decoding.step), through lminf's C++ layers where they build (lminf.decoding.native_stack)."""

from lminf.decoding.step import LLAMA_SHAPED, FastStep, why_not

__all__ = ["LLAMA_SHAPED", "FastStep", "why_not"]
