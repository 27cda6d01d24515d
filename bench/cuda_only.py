"""A pytest plugin that keeps only the tests that need CUDA: ``python -m pytest tests -p bench.cuda_only``.

A test needs CUDA when it carries the ``gpu`` marker, a ``skipif`` whose reason names CUDA or a GPU, or
``cuda`` in its parameters' id (the parametrised device of tests/test_attention*.py). Everything else
is deselected (it runs in the CPU suite). ``--cuda-only-list`` prints the selection and runs nothing.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--cuda-only-list", action="store_true", help="print the CUDA tests and run nothing")


def needs_cuda(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if item.get_closest_marker("gpu") is not None or (callspec is not None and "cuda" in callspec.id.lower()):
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if "cuda" in reason or "gpu" in reason:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_cuda(item)]
    dropped = [item for item in items if not needs_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    if config.getoption("--cuda-only-list"):
        for item in keep:
            print(item.nodeid)
        items[:] = []
