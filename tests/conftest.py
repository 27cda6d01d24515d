import os

import pytest
import torch

# Triton kernels run in its interpreter on machines without CUDA; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # CI builds the native extension; its tests skip where it is not built, so CI demands it instead
    from fastnest.dispatch import native_error

    if os.environ.get("FASTNEST_REQUIRE_NATIVE") == "1" and native_error() is not None:
        raise pytest.UsageError(f"FASTNEST_REQUIRE_NATIVE=1 but {native_error()}")
