"""Fixtures shared by the test modules (their helpers: tests/helpers.py) and the C++ compiler probe."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import TINY_CONFIGS

# torch.compile's CPU backend builds C++: kernel "compiled" runs only where a compiler is.
HAS_CXX = any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param
