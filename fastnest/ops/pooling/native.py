"""Native CPU backend of the multi-scale pooling: wrappers of ``fastnest._C.pool`` and ``fastnest._C.fold``
(kernels/cpu/pool.cpp): every scale in one pass over ``y`` (a pyramid of fp32 sums) and the adjoint, each
``grad_y`` row written once. Inputs may be non-contiguous; the kernels read contiguous copies. Kernels run on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch

from ...scales import MatryoshkaScales
from ..native_common import DTYPE_CODES, check, check_spec, extension


def pool_into(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, spec: MatryoshkaScales) -> None:
    """``out [N, spec.total, C]`` from the contiguous ``y [N*G*G, C]`` + ``bias``."""
    extension().pool(
        y.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out.shape[0],
        spec.grid,
        out.shape[2],
        list(spec.kernels),
        list(spec.offsets),
        spec.total,
        DTYPE_CODES[out.dtype],
        torch.get_num_threads(),
    )


@torch.no_grad()
def pool(y: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """Every scale's average pooling of ``y [N*G*G, D]`` (row-major grids): ``[N, spec.total, D]``."""
    spec = check_spec(spec)
    check("y", y, 2)
    cells = spec.tokens_per_image
    if y.shape[0] % cells:
        raise ValueError(f"y must have N*{cells} rows for a {spec.grid}x{spec.grid} grid, got {y.shape[0]}")
    y = y.contiguous()
    out = torch.empty(y.shape[0] // cells, spec.total, y.shape[1], dtype=y.dtype)
    pool_into(y, None, out, spec)
    return out


@torch.no_grad()
def fold(grad_out: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """The adjoint of the pooling: ``grad_out [N, spec.total, D]`` -> ``grad_y [N*G*G, D]``."""
    spec = check_spec(spec)
    check("grad_out", grad_out, 3)
    if grad_out.shape[1] != spec.total:
        raise ValueError(f"grad_out must be [N, {spec.total}, D] for scales {spec.scales}, got {tuple(grad_out.shape)}")
    grad_out = grad_out.contiguous()
    n, _, d = grad_out.shape
    grad_y = torch.empty(n * spec.tokens_per_image, d, dtype=grad_out.dtype)
    extension().fold(
        grad_out.data_ptr(),
        grad_y.data_ptr(),
        n,
        spec.grid,
        d,
        list(spec.kernels),
        list(spec.offsets),
        spec.total,
        DTYPE_CODES[grad_out.dtype],
        torch.get_num_threads(),
    )
    return grad_y
