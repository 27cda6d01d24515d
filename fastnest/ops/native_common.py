"""Argument checks and the extension handle shared by the wrappers of ``fastnest._C`` (the ops' native.py files).

The wrappers validate every tensor (device, dimensions, dtype, shapes) before passing data pointers, so a wrong
call raises a ValueError naming the bad argument instead of reaching the kernels.
"""

from __future__ import annotations

import torch

from ..scales import MatryoshkaScales

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def extension():
    """The module ``fastnest._C``, or RuntimeError saying why it cannot be imported."""
    try:
        from .. import _C
    except ImportError as e:
        raise RuntimeError(
            f"the native extension fastnest._C is not built ({e}); reinstall fastnest with a C++ compiler and cmake"
        ) from e
    return _C


def check(name: str, t: object, dim: int, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend, got device {t.device}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {tuple(DTYPE_CODES)}")
    elif t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (all inputs share one dtype)")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_spec(spec: object) -> MatryoshkaScales:
    if not isinstance(spec, MatryoshkaScales):
        raise ValueError(f"spec must be a fastnest.MatryoshkaScales, got {type(spec).__name__}")
    return spec
