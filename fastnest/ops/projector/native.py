"""Native CPU backend of the fused projector + multi-scale pooling: torch GEMMs (MKL) and the C++/OpenMP kernels
of ``fastnest._C`` (kernels/cpu/) for everything else.

The three functions are pure tensor functions (no autograd; the autograd.Function lives in
fastnest/ops/projector/function.py):

- ``linear_gelu``: ``pre = x @ w1.T`` by GEMM, then one native pass adds ``b1``, keeps ``pre`` and writes ``gelu(pre)``.
- ``linear_pool``: with the full-resolution scale (kernel 1) configured, one GEMM ``y = h @ w2.T``, then one native
  pass over ``y`` adds ``b2``, copies it to the kernel-1 block and pools every other scale (a pyramid of fp32
  sums). (Per-image GEMMs writing straight into the kernel-1 blocks measured ~1.5x slower in MKL.) Without that
  scale, ``h`` is pooled first and the GEMM runs on the ``spec.total`` pooled rows only (fewer than ``grid**2``):
  pooling and a linear map commute, so only rounding differs.
- ``linear_gelu_backward``: ``grad_y @ w2`` by GEMM, then ``* gelu'(pre)`` in place.

The pooling alone and its adjoint (``pool``, ``fold``) are in fastnest/ops/pooling/native.py.

Inputs may be non-contiguous (autograd hands out expanded gradients); the kernels read contiguous copies. Means
and sums accumulate in fp32 (fp64 for fp64). Kernels run on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch

from ...scales import MatryoshkaScales
from ..native_common import DTYPE_CODES, check, check_shape, check_spec, extension
from ..pooling.native import pool_into

_GELU_CODES = {"none": 0, "tanh": 1}


def _gelu_code(approximate: str) -> int:
    if approximate not in _GELU_CODES:
        raise ValueError(f"approximate must be one of {tuple(_GELU_CODES)}, got {approximate!r}")
    return _GELU_CODES[approximate]


@torch.no_grad()
def linear_gelu(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, approximate: str, keep_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = gelu(x @ w1.T + b1)`` for ``x [M, K]``, ``w1 [H, K]``, ``b1 [H]``; also ``pre`` when ``keep_pre``."""
    code = _gelu_code(approximate)
    check("x", x, 2)
    check("w1", w1, 2, x.dtype)
    if w1.shape[1] != x.shape[1]:
        raise ValueError(f"w1 must be [H, {x.shape[1]}] for x {tuple(x.shape)}, got {tuple(w1.shape)}")
    if b1 is not None:
        check("b1", b1, 1, x.dtype)
        check_shape("b1", b1, (w1.shape[0],))
        b1 = b1.contiguous()
    pre = torch.mm(x, w1.t())
    h = torch.empty_like(pre) if keep_pre else pre
    m, hidden = pre.shape
    extension().gelu_forward(
        pre.data_ptr(),
        0 if b1 is None else b1.data_ptr(),
        h.data_ptr(),
        m,
        hidden,
        DTYPE_CODES[x.dtype],
        code,
        torch.get_num_threads(),
    )
    return h, (pre if keep_pre else None)


@torch.no_grad()
def linear_pool(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, spec: MatryoshkaScales) -> torch.Tensor:
    """``y = h @ w2.T + b2`` pooled to every scale: ``h [N*G*G, H]`` -> ``[N, spec.total, D]``."""
    spec = check_spec(spec)
    check("h", h, 2)
    check("w2", w2, 2, h.dtype)
    cells = spec.tokens_per_image
    if h.shape[0] % cells:
        raise ValueError(f"h must have N*{cells} rows for a {spec.grid}x{spec.grid} grid, got {h.shape[0]}")
    if w2.shape[1] != h.shape[1]:
        raise ValueError(f"w2 must be [D, {h.shape[1]}] for h {tuple(h.shape)}, got {tuple(w2.shape)}")
    d = w2.shape[0]
    if b2 is not None:
        check("b2", b2, 1, h.dtype)
        check_shape("b2", b2, (d,))
        b2 = b2.contiguous()
    n = h.shape[0] // cells
    if 1 not in spec.kernels:
        # Pool h, then the GEMM on spec.total < grid**2 rows per image.
        h = h.contiguous()
        pooled = torch.empty(n, spec.total, h.shape[1], dtype=h.dtype)
        pool_into(h, None, pooled, spec)
        flat = pooled.view(n * spec.total, h.shape[1])
        y = torch.mm(flat, w2.t()) if b2 is None else torch.addmm(b2, flat, w2.t())
        return y.view(n, spec.total, d)
    y = torch.mm(h, w2.t())
    out = torch.empty(n, spec.total, d, dtype=h.dtype)
    pool_into(y, b2, out, spec)
    return out


@torch.no_grad()
def linear_gelu_backward(grad_y: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, approximate: str) -> torch.Tensor:
    """``grad_pre = (grad_y @ w2) * gelu'(pre)`` for ``grad_y [M, D]``, ``w2 [D, H]``, ``pre [M, H]``."""
    code = _gelu_code(approximate)
    check("grad_y", grad_y, 2)
    check("w2", w2, 2, grad_y.dtype)
    check("pre", pre, 2, grad_y.dtype)
    if w2.shape[0] != grad_y.shape[1]:
        raise ValueError(f"w2 must be [{grad_y.shape[1]}, H] for grad_y {tuple(grad_y.shape)}, got {tuple(w2.shape)}")
    check_shape("pre", pre, (grad_y.shape[0], w2.shape[1]))
    pre = pre.contiguous()
    grad_pre = torch.mm(grad_y, w2)
    extension().gelu_backward(
        grad_pre.data_ptr(),
        pre.data_ptr(),
        grad_pre.numel(),
        DTYPE_CODES[grad_pre.dtype],
        code,
        torch.get_num_threads(),
    )
    return grad_pre
