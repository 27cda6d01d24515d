"""Triton kernels of the multi-scale average pooling: one pyramid level per launch, and the fold (its adjoint).

The pyramid pools each scale from the coarsest level already written whose kernel divides its own; the fold
spreads each pooled row's gradient (1/k^2 per window row) back onto the full-grid gradient. The fused GEMM2 of
fastnest/ops/projector/triton.py also uses the pyramid for its second reduction over 8x8 tile means.
Functions here take 2-D row-major tensors (see fastnest/ops/__init__.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...scales import MatryoshkaScales

BLOCK_D = 128  # feature block of the pooling and fold kernels
BLOCK_P = 32  # grid rows per fold program
BLOCK_C = 16  # pooled cells per pyramid-level program


@triton.jit
def pool_kernel(
    src_ptr,
    dst_ptr,
    D,
    SRC_SIDE,
    SRC_IMG_ROWS,
    DST_IMG_ROWS,
    K,
    CELLS,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One pyramid level: dst[img, cell] = mean of the K x K window of src[img] (a row-major SRC_SIDE^2 grid).

    src/dst rows of image ``img`` start at ``img * SRC_IMG_ROWS`` / ``img * DST_IMG_ROWS``; both have row stride D.
    """
    blocks = tl.cdiv(CELLS, BLOCK_C)
    img = tl.program_id(0) // blocks
    cells = (tl.program_id(0) % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (cells[:, None] < CELLS) & (offs_d[None, :] < D)
    side = SRC_SIDE // K
    corner = (cells // side) * K * SRC_SIDE + (cells % side) * K
    src = src_ptr + img.to(tl.int64) * SRC_IMG_ROWS * D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for w in range(0, K * K):
        rows = corner + (w // K) * SRC_SIDE + w % K
        acc += tl.load(src + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = acc / (K * K).to(tl.float32)
    dst = dst_ptr + img.to(tl.int64) * DST_IMG_ROWS * D + (cells[:, None] * D + offs_d[None, :])
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fold_kernel(
    grad_ptr,
    dst_ptr,
    kernels_ptr,
    offsets_ptr,
    ROWS,
    D,
    G,
    TOTAL,
    NUM_SCALES,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_y[img, p] = sum over scales of grad_out[img, off_s + cell_s(p)] / k_s^2: the pooling's adjoint."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (offs_d[None, :] < D)
    img = rows // (G * G)
    p = rows % (G * G)
    py = p // G
    px = p % G
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for s in range(0, NUM_SCALES):
        k = tl.load(kernels_ptr + s)
        off = tl.load(offsets_ptr + s)
        src = img.to(tl.int64) * TOTAL + off + (py // k) * (G // k) + px // k
        g = tl.load(grad_ptr + src[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += g * (1.0 / (k * k).to(tl.float32))
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], acc.to(dst_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def pyramid(src: torch.Tensor, out: torch.Tensor, grid: int, levels: tuple[tuple[int, int], ...]) -> None:
    """Pool ``src [N, grid^2, D]`` into ``out [N, total, D]`` for each (kernel, output offset) in ``levels``.

    Finest first; each level reads the coarsest level already written whose kernel divides its own, so a 27x27
    grid's 81/9/1-token scales each average 3x3 windows of the level before, not 3x3, 9x9 and 27x27 of the grid.
    """
    n, _, d = src.shape
    done: list[tuple[int, int]] = []  # (kernel, offset) of levels written to out
    for k, off in sorted(levels):
        base_k, base = max(((bk, out[:, bo:]) for bk, bo in done if k % bk == 0), default=(1, src), key=lambda t: t[0])
        side = grid // base_k
        cells = (grid // k) ** 2
        pool_kernel[(n * triton.cdiv(cells, BLOCK_C), triton.cdiv(d, BLOCK_D))](
            base,
            out[:, off:],
            d,
            side,
            base.stride(0) // d,
            out.shape[1],
            k // base_k,
            cells,
            BLOCK_C=BLOCK_C,
            BLOCK_D=BLOCK_D,
        )
        done.append((k, off))


def pool(y: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """Multi-scale pooling of ``y [N * grid^2, D]`` -> ``[N, spec.total, D]`` (general pyramid kernel)."""
    d = y.shape[1]
    y = y.view(-1, spec.tokens_per_image, d)
    out = torch.empty(y.shape[0], spec.total, d, device=y.device, dtype=y.dtype)
    pyramid(y, out, spec.grid, tuple(zip(spec.kernels, spec.offsets)))
    return out


@functools.cache
def _scale_arrays(spec: MatryoshkaScales, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    as_int32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_int32(spec.kernels), as_int32(spec.offsets)


def fold(grad_out: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    n, total, d = grad_out.shape
    rows = n * spec.tokens_per_image
    grad_y = torch.empty(rows, d, device=grad_out.device, dtype=grad_out.dtype)
    kernels, offsets = _scale_arrays(spec, grad_out.device)
    fold_kernel[(triton.cdiv(rows, BLOCK_P), triton.cdiv(d, BLOCK_D))](
        grad_out,
        grad_y,
        kernels,
        offsets,
        rows,
        d,
        spec.grid,
        total,
        len(spec.kernels),
        BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D,
    )
    return grad_y
