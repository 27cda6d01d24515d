"""Native CPU backend of the fused projector + multi-scale pooling: torch GEMMs (MKL) and the C++/OpenMP kernels
of ``fastnest._C`` (kernels/cpu/) for everything else.

The four functions are pure tensor functions (no autograd; the autograd.Function lives in fastnest/projector.py):

- ``linear_gelu``: ``pre = x @ w1.T`` by GEMM, then one native pass adds ``b1``, keeps ``pre`` and writes ``gelu(pre)``.
- ``linear_pool``: with the full-resolution scale (kernel 1) configured, one GEMM ``y = h @ w2.T``, then one native
  pass over ``y`` adds ``b2``, copies it to the kernel-1 block and pools every other scale (a pyramid of fp32
  sums). (Per-image GEMMs writing straight into the kernel-1 blocks measured ~1.5x slower in MKL.) Without that
  scale, ``h`` is pooled first and the GEMM runs on the ``spec.total`` pooled rows only (fewer than ``grid**2``):
  pooling and a linear map commute, so only rounding differs.
- ``pool``: the pooling alone, for projectors that are not fused (``y [N*G*G, D]`` -> ``[N, spec.total, D]``).
- ``fold``: the pooling's adjoint in one pass, each ``grad_y`` row written once.
- ``linear_gelu_backward``: ``grad_y @ w2`` by GEMM, then ``* gelu'(pre)`` in place.

Inputs may be non-contiguous (autograd hands out expanded gradients); the kernels read contiguous copies. Means
and sums accumulate in fp32 (fp64 for fp64). Kernels run on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch

from ..scales import MatryoshkaScales

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_GELU_CODES = {"none": 0, "tanh": 1}


def _native():
    try:
        from .. import _C
    except ImportError as e:
        raise RuntimeError(
            f"the native extension fastnest._C is not built ({e}); reinstall fastnest with a C++ compiler and cmake"
        ) from e
    return _C


def _check(name: str, t: object, dim: int, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend, got device {t.device}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {tuple(_DTYPE_CODES)}")
    elif t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (all inputs share one dtype)")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _gelu_code(approximate: str) -> int:
    if approximate not in _GELU_CODES:
        raise ValueError(f"approximate must be one of {tuple(_GELU_CODES)}, got {approximate!r}")
    return _GELU_CODES[approximate]


def _check_spec(spec: object) -> MatryoshkaScales:
    if not isinstance(spec, MatryoshkaScales):
        raise ValueError(f"spec must be a fastnest.MatryoshkaScales, got {type(spec).__name__}")
    return spec


@torch.no_grad()
def linear_gelu(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, approximate: str, keep_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = gelu(x @ w1.T + b1)`` for ``x [M, K]``, ``w1 [H, K]``, ``b1 [H]``; also ``pre`` when ``keep_pre``."""
    code = _gelu_code(approximate)
    _check("x", x, 2)
    _check("w1", w1, 2, x.dtype)
    if w1.shape[1] != x.shape[1]:
        raise ValueError(f"w1 must be [H, {x.shape[1]}] for x {tuple(x.shape)}, got {tuple(w1.shape)}")
    if b1 is not None:
        _check("b1", b1, 1, x.dtype)
        _check_shape("b1", b1, (w1.shape[0],))
        b1 = b1.contiguous()
    pre = torch.mm(x, w1.t())
    h = torch.empty_like(pre) if keep_pre else pre
    m, hidden = pre.shape
    _native().gelu_forward(
        pre.data_ptr(),
        0 if b1 is None else b1.data_ptr(),
        h.data_ptr(),
        m,
        hidden,
        _DTYPE_CODES[x.dtype],
        code,
        torch.get_num_threads(),
    )
    return h, (pre if keep_pre else None)


def _pool_native(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, spec: MatryoshkaScales) -> None:
    """``out [N, spec.total, C]`` from the contiguous ``y [N*G*G, C]`` + ``bias``."""
    _native().pool(
        y.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out.shape[0],
        spec.grid,
        out.shape[2],
        list(spec.kernels),
        list(spec.offsets),
        spec.total,
        _DTYPE_CODES[out.dtype],
        torch.get_num_threads(),
    )


@torch.no_grad()
def linear_pool(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, spec: MatryoshkaScales) -> torch.Tensor:
    """``y = h @ w2.T + b2`` pooled to every scale: ``h [N*G*G, H]`` -> ``[N, spec.total, D]``."""
    spec = _check_spec(spec)
    _check("h", h, 2)
    _check("w2", w2, 2, h.dtype)
    cells = spec.tokens_per_image
    if h.shape[0] % cells:
        raise ValueError(f"h must have N*{cells} rows for a {spec.grid}x{spec.grid} grid, got {h.shape[0]}")
    if w2.shape[1] != h.shape[1]:
        raise ValueError(f"w2 must be [D, {h.shape[1]}] for h {tuple(h.shape)}, got {tuple(w2.shape)}")
    d = w2.shape[0]
    if b2 is not None:
        _check("b2", b2, 1, h.dtype)
        _check_shape("b2", b2, (d,))
        b2 = b2.contiguous()
    n = h.shape[0] // cells
    if 1 not in spec.kernels:
        # Pool h, then the GEMM on spec.total < grid**2 rows per image.
        h = h.contiguous()
        pooled = torch.empty(n, spec.total, h.shape[1], dtype=h.dtype)
        _pool_native(h, None, pooled, spec)
        flat = pooled.view(n * spec.total, h.shape[1])
        y = torch.mm(flat, w2.t()) if b2 is None else torch.addmm(b2, flat, w2.t())
        return y.view(n, spec.total, d)
    y = torch.mm(h, w2.t())
    out = torch.empty(n, spec.total, d, dtype=h.dtype)
    _pool_native(y, b2, out, spec)
    return out


@torch.no_grad()
def pool(y: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """Every scale's average pooling of ``y [N*G*G, D]`` (row-major grids): ``[N, spec.total, D]``."""
    spec = _check_spec(spec)
    _check("y", y, 2)
    cells = spec.tokens_per_image
    if y.shape[0] % cells:
        raise ValueError(f"y must have N*{cells} rows for a {spec.grid}x{spec.grid} grid, got {y.shape[0]}")
    y = y.contiguous()
    out = torch.empty(y.shape[0] // cells, spec.total, y.shape[1], dtype=y.dtype)
    _pool_native(y, None, out, spec)
    return out


@torch.no_grad()
def fold(grad_out: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """The adjoint of the pooling: ``grad_out [N, spec.total, D]`` -> ``grad_y [N*G*G, D]``."""
    spec = _check_spec(spec)
    _check("grad_out", grad_out, 3)
    if grad_out.shape[1] != spec.total:
        raise ValueError(f"grad_out must be [N, {spec.total}, D] for scales {spec.scales}, got {tuple(grad_out.shape)}")
    grad_out = grad_out.contiguous()
    n, _, d = grad_out.shape
    grad_y = torch.empty(n * spec.tokens_per_image, d, dtype=grad_out.dtype)
    _native().fold(
        grad_out.data_ptr(),
        grad_y.data_ptr(),
        n,
        spec.grid,
        d,
        list(spec.kernels),
        list(spec.offsets),
        spec.total,
        _DTYPE_CODES[grad_out.dtype],
        torch.get_num_threads(),
    )
    return grad_y


@torch.no_grad()
def linear_gelu_backward(grad_y: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, approximate: str) -> torch.Tensor:
    """``grad_pre = (grad_y @ w2) * gelu'(pre)`` for ``grad_y [M, D]``, ``w2 [D, H]``, ``pre [M, H]``."""
    code = _gelu_code(approximate)
    _check("grad_y", grad_y, 2)
    _check("w2", w2, 2, grad_y.dtype)
    _check("pre", pre, 2, grad_y.dtype)
    if w2.shape[0] != grad_y.shape[1]:
        raise ValueError(f"w2 must be [{grad_y.shape[1]}, H] for grad_y {tuple(grad_y.shape)}, got {tuple(w2.shape)}")
    _check_shape("pre", pre, (grad_y.shape[0], w2.shape[1]))
    pre = pre.contiguous()
    grad_pre = torch.mm(grad_y, w2)
    _native().gelu_backward(
        grad_pre.data_ptr(),
        pre.data_ptr(),
        grad_pre.numel(),
        _DTYPE_CODES[grad_pre.dtype],
        code,
        torch.get_num_threads(),
    )
    return grad_pre
