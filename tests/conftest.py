"""Fixtures shared by the test modules (their helpers: tests/helpers.py) and the C++ compiler probe."""

from __future__ import annotations

import os

import pytest
import torch

from lminf.decoding import native
from tests.helpers import TINY_CONFIGS

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the cores instead of each taking all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# lminf's C++ kernels build where their compiler is (lminf.decoding.native); there a failed build fails the tests.
HAS_CXX = native.has_compiler()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reads the default model's tokenizer needs the default model (converted on first use)."""
    for item in items:
        if "default_tokenizer" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def default_tokenizer():
    from transformers import AutoTokenizer

    from lminf.default_model import converted_folder

    return AutoTokenizer.from_pretrained(converted_folder())


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Each phase's report on the test (item.rep_call...): a fixture's teardown can see the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
