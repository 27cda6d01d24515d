"""Projector + multi-scale pooling, fused when the projector is a linear -> GELU -> linear MLP.

``matryoshka_project`` recognises LLaVA's projector (registered by fastnest.hf), ``nn.Sequential(Linear, GELU,
Linear)`` (the original LLaVA ``mlp2x_gelu``) and any class registered with ``register_projector``; the fused
kernels then run GEMM1+GELU and GEMM2 with the pooling in its epilogue. Anything else runs the module, then pools.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ...dispatch import resolve_backend
from ...scales import MatryoshkaScales
from ..pooling.function import pool
from ..pooling.naive import multiscale_pool

ProjectorParts = tuple[nn.Linear, nn.Module, nn.Linear]

_PROJECTORS: dict[type, Callable[[nn.Module], ProjectorParts]] = {
    nn.Sequential: lambda m: tuple(m) if len(m) == 3 else None,
}
_GELUS: dict[type, Callable[[nn.Module], str]] = {nn.GELU: lambda m: m.approximate}


def register_projector(cls: type, parts: Callable[[nn.Module], ProjectorParts | None]) -> None:
    """Declare that ``cls.forward(x)`` is ``linear_2(act(linear_1(x)))`` for the parts returned by ``parts``."""
    _PROJECTORS[cls] = parts


def register_gelu(cls: type, approximate: Callable[[nn.Module], str]) -> None:
    """Declare that ``cls`` computes ``F.gelu(x, approximate=approximate(module))``."""
    _GELUS[cls] = approximate


def _plain(module: nn.Module) -> bool:
    # hooks or an instance-level forward (accelerate, PEFT wrappers) may change what the module computes
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def fusable_parts(projector: nn.Module) -> tuple[nn.Linear, str, nn.Linear] | None:
    """``(linear_1, gelu approximation, linear_2)`` when the fused kernels compute exactly ``projector``."""
    get_parts = _PROJECTORS.get(type(projector))
    parts = get_parts(projector) if get_parts is not None else None
    if parts is None or not _plain(projector):
        return None
    l1, act, l2 = parts
    gelu = _GELUS.get(type(act))
    if gelu is None or type(l1) is not nn.Linear or type(l2) is not nn.Linear or not all(map(_plain, parts)):
        return None
    return l1, gelu(act), l2


class ProjectorKernels(NamedTuple):
    """A backend's fused projector kernels (see fastnest/ops/projector/triton.py and native.py)."""

    linear_gelu: Callable
    linear_pool: Callable
    linear_gelu_backward: Callable
    fold: Callable


def _triton() -> ProjectorKernels:
    from ..pooling import triton as pooling
    from . import triton

    return ProjectorKernels(triton.linear_gelu, triton.linear_pool, triton.linear_gelu_backward, pooling.fold)


def _native() -> ProjectorKernels:
    from ..pooling import native as pooling
    from . import native

    return ProjectorKernels(native.linear_gelu, native.linear_pool, native.linear_gelu_backward, pooling.fold)


_KERNELS: dict[str, Callable[[], ProjectorKernels]] = {"triton": _triton, "native": _native}


class _ProjectPool(torch.autograd.Function):
    """pool(linear_2(gelu(linear_1(x)))) to every scale; saves x, the pre-activation and the GELU output."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, spec: MatryoshkaScales, approximate: str, ops: ProjectorKernels, train: bool):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w1, w2 = w1.contiguous(), w2.contiguous()
        h, pre = ops.linear_gelu(x2, w1, b1, approximate, train)
        out = ops.linear_pool(h, w2, b2, spec)
        if train:
            ctx.save_for_backward(x2, w1, w2, h, pre)
            ctx.spec, ctx.approximate, ctx.ops, ctx.x_shape = spec, approximate, ops, x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, w1, w2, h, pre = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_y = ctx.ops.fold(grad_out.contiguous(), ctx.spec)  # [N * grid^2, D]
        grad_w2 = grad_y.t() @ h if need_w2 else None
        grad_b2 = grad_y.sum(0) if need_b2 else None
        grad_x = grad_w1 = grad_b1 = None
        if need_x or need_w1 or need_b1:
            grad_pre = ctx.ops.linear_gelu_backward(grad_y, w2, pre, ctx.approximate)
            grad_x = (grad_pre @ w1).view(ctx.x_shape) if need_x else None
            grad_w1 = grad_pre.t() @ x2 if need_w1 else None
            grad_b1 = grad_pre.sum(0) if need_b1 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None


def _spec_for(x: torch.Tensor, scales: tuple[int, ...] | MatryoshkaScales) -> MatryoshkaScales:
    grid = math.isqrt(x.shape[1]) if x.dim() == 3 else 0
    if x.dim() != 3 or grid * grid != x.shape[1]:
        raise ValueError(f"expected features [N, grid*grid, D] on a square grid, got shape {tuple(x.shape)}")
    spec = scales if isinstance(scales, MatryoshkaScales) else MatryoshkaScales(grid, scales)
    if spec.grid != grid:
        raise ValueError(f"scales are for a {spec.grid}x{spec.grid} grid but features hold a {grid}x{grid} grid")
    return spec


def matryoshka_project(
    x: torch.Tensor,
    projector: Callable[[torch.Tensor], torch.Tensor],
    scales: tuple[int, ...] | MatryoshkaScales,
    backend: str | None = None,
) -> torch.Tensor:
    """Project vision features ``x [N, grid*grid, Dv]`` and pool the result to every scale.

    Returns ``[N, sum(scales), D]`` (each image's scales in the order given, row-major inside a scale), pooled
    AFTER the projector as the released M3 checkpoints expect. ``backend`` (None/"auto", "triton", "native",
    "torch") is resolved by ``fastnest.dispatch.resolve_backend``; "torch" runs the module, then pools.
    """
    spec = _spec_for(x, scales)
    backend = resolve_backend("projector", x.device, backend)
    parts = fusable_parts(projector) if isinstance(projector, nn.Module) else None
    if backend == "torch" or x.shape[0] == 0:
        return multiscale_pool(projector(x), spec)
    if parts is None:
        return pool(projector(x), spec, backend)
    l1, approximate, l2 = parts
    tensors = (x, l1.weight, l1.bias, l2.weight, l2.bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # what nn.Linear would compute under autocast
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(t if t is None else t.to(dtype) for t in tensors)
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"features are {x.dtype} but projector parameters are {sorted(map(str, dtypes))}")
    # ctx.needs_input_grad ignores no_grad mode; inference must not keep the pre-activation
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    with torch.autocast(device_type, enabled=False):
        return _ProjectPool.apply(*tensors, spec, approximate, _KERNELS[backend](), train)
