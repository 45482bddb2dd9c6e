"""Caches that hold what a strategy's attention reads."""

from lminf.caches.lambda_cache import LambdaCache, LambdaLayer
from lminf.caches.turn_cache import ScoredLayer, TurnCache, begin_turn

__all__ = ["LambdaCache", "LambdaLayer", "ScoredLayer", "TurnCache", "begin_turn"]
