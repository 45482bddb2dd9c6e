"""Caches that hold what a strategy's attention reads."""

from lminf.caches.lambda_cache import LambdaCache, LambdaLayer

__all__ = ["LambdaCache", "LambdaLayer"]
