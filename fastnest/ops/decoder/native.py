"""Wrappers of ``fastnest._C``'s RMSNorm, SwiGLU and rotary kernels (kernels/cpu/{rms_norm,swiglu,rotary}.cpp):
the tensors checked, the outputs allocated, no autograd. OpenMP on ``torch.get_num_threads()`` threads, the GIL
released."""

from __future__ import annotations

import torch

from ..native_common import DTYPE_CODES, check, check_shape, extension


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    check(name, t, t.dim())
    return t.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` of ``x [..., D]`` and ``weight [D]`` (one dtype): ``rstd [rows]`` in fp32 (fp64 for fp64)."""
    x = _rows("x", x)
    check("weight", weight, 1, x.dtype)
    check_shape("weight", weight, (x.shape[-1],))
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    weight = weight.contiguous()
    extension().rms_norm_forward(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, cols, float(eps),
        DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` from the forward's ``rstd``."""
    x, dy = _rows("x", x), _rows("dy", dy)
    check("dy", dy, x.dim(), x.dtype)
    check_shape("dy", dy, tuple(x.shape))
    cols = x.shape[-1]
    rows = x.numel() // cols
    check_shape("rstd", rstd, (rows,))
    dx, dw = torch.empty_like(x), torch.empty_like(weight)
    extension().rms_norm_backward(
        dy.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(),
        rows, cols, DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return dx, dw


def _pair(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate = _rows("gate", gate)
    check("up", up, gate.dim(), gate.dtype)
    check_shape("up", up, tuple(gate.shape))
    return gate, up.contiguous()


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (one shape and dtype)."""
    gate, up = _pair(gate, up)
    h = torch.empty_like(gate)
    extension().swiglu_forward(
        gate.data_ptr(), up.data_ptr(), h.data_ptr(), gate.numel(), DTYPE_CODES[gate.dtype], torch.get_num_threads()
    )
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``silu(gate) * up``."""
    gate, up = _pair(gate, up)
    dh = _rows("dh", dh)
    check("dh", dh, gate.dim(), gate.dtype)
    check_shape("dh", dh, tuple(gate.shape))
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    extension().swiglu_backward(
        dh.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(), gate.numel(),
        DTYPE_CODES[gate.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return dgate, dup


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """``x [T, H, d]`` (each token's heads contiguous, any token stride), ``cos``/``sin [T, d]`` (x's dtype):
    ``x * cos + rotate_half(x) * sin`` per head as a new contiguous tensor; ``backward``: the transposed map,
    the gradient of that with respect to x when x is the output's gradient."""
    check("x", x, 3)
    tokens, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"the head dimension must be even for the rotary embedding, got {dim}")
    if x.stride(2) != 1 or x.stride(1) != dim or x.stride(0) < heads * dim:
        x = x.contiguous()
    for name, t in (("cos", cos), ("sin", sin)):
        check(name, t, 2, x.dtype)
        check_shape(name, t, (tokens, dim))
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    extension().rotary(
        x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), tokens, heads, dim, backward,
        DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return out
