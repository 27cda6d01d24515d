"""Multi-scale pooling through a backend's kernels, with autograd: the backend table of the pooling op."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ...dispatch import resolve_backend
from ...scales import MatryoshkaScales
from .naive import multiscale_pool


class PoolKernels(NamedTuple):
    """A backend's pooling ``pool(y [N*G*G, D], spec) -> [N, total, D]`` and its adjoint ``fold``."""

    pool: Callable[[torch.Tensor, MatryoshkaScales], torch.Tensor]
    fold: Callable[[torch.Tensor, MatryoshkaScales], torch.Tensor]


def _triton() -> PoolKernels:
    from . import triton

    return PoolKernels(triton.pool, triton.fold)


def _native() -> PoolKernels:
    from . import native

    return PoolKernels(native.pool, native.fold)


_KERNELS: dict[str, Callable[[], PoolKernels]] = {"triton": _triton, "native": _native}


class _Pool(torch.autograd.Function):
    """Multi-scale pooling of an arbitrary projector's output with a backend's pool and fold kernels."""

    @staticmethod
    def forward(ctx, y, spec: MatryoshkaScales, kernels: PoolKernels):
        ctx.spec, ctx.kernels, ctx.y_shape = spec, kernels, y.shape
        return kernels.pool(y.reshape(-1, y.shape[-1]).contiguous(), spec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return ctx.kernels.fold(grad_out.contiguous(), ctx.spec).view(ctx.y_shape), None, None


def pool(y: torch.Tensor, spec: MatryoshkaScales, backend: str | None = None) -> torch.Tensor:
    """``multiscale_pool(y, spec)`` (``y [N, grid*grid, D]``) by ``backend`` (resolved by fastnest.dispatch):
    "torch" is the plain reference, "triton" and "native" run their pool kernel forward and fold backward."""
    backend = resolve_backend("pooling", y.device, backend)
    if backend == "torch" or y.shape[0] == 0:
        return multiscale_pool(y, spec)
    return _Pool.apply(y, spec, _KERNELS[backend]())
