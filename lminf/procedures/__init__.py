"""Procedures around a model: ways to answer from an input longer than the model's training
length by calling the plain, unpatched model on shorter inputs, not by changing its attention
(that is lminf.strategies)."""

from lminf.procedures.xl3m import XL3M, Selection

PROCEDURES = {"xl3m": XL3M}

__all__ = ["PROCEDURES", "XL3M", "Selection"]
