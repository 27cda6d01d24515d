"""The one place that decides which implementation runs an op: Triton, the native CPU extension, or PyTorch."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "native", "torch")


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def native_error() -> str | None:
    """Why the native extension cannot be used (None when it can)."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return f"the native extension fastnest._C is not built ({e}); reinstall fastnest with a C++ compiler and cmake"
    return None


def native_available() -> bool:
    return native_error() is None


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on CPU)"
        return None
    if device.type != "cpu":
        return f"the native extension runs on CPU tensors, got {device.type}"
    return native_error()


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend an op runs with on ``device``.

    ``None``/``"auto"``: CUDA (with Triton) -> ``"triton"``; CPU -> ``"native"`` when ``fastnest._C`` is built,
    else ``"torch"``. A named backend is returned as is, or ValueError says why it cannot run; nothing falls
    back silently.
    """
    device = torch.device(device)
    if backend is None or backend == "auto":
        for candidate in ("triton", "native") if device.type == "cuda" else ("native",):
            if _unavailable(candidate, device) is None:
                return candidate
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {('auto', *BACKENDS)}")
    reason = _unavailable(backend, device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is unavailable: {reason}")
    return backend
