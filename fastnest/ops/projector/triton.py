"""Triton kernels for the projector (linear -> GELU -> linear) with multi-scale average pooling fused into it.

Forward: GEMM1 + bias + GELU in one kernel; GEMM2 + bias with the pooling in its epilogue. The fused GEMM2
orders its M dimension by 8x8 spatial tiles of the grid (64 rows per tile), so one output tile yields its 2x2,
4x4 and 8x8 means from the fp32 accumulator without re-reading the output; scales whose kernel is a multiple of
8 (the whole-image mean of a 24x24 grid) come from a second reduction over the tiles' 8x8 means. Any other
scale set or grid (SigLIP 27x27, kernel 3, 6, 12...) takes plain GEMM2 + the general pyramid-pooling kernel.
Backward: the fold kernel (fastnest/ops/pooling/triton.py) spreads each pooled row's gradient back onto the
full-grid gradient that feeds GEMM2's backward, whose epilogue applies GELU's derivative.

Functions here take 2-D row-major tensors and follow the contract of fastnest/ops/__init__.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...scales import MatryoshkaScales
from ..pooling.triton import pool, pyramid
from ..triton_common import gelu, gelu_grad, mainloop

TILE = 8  # spatial tile side of the fused GEMM2: BLOCK_M = 64 rows, one warpgroup's wgmma M on sm_90
TILE_LEVELS = (1, 2, 4, 8)  # kernels the fused epilogue produces inside a tile

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per input dtype; the dispatcher chooses nothing else. Chosen
# from the AOT reports (python -m bench.static_report): the widest tiles whose GELU epilogues do not spill on sm_80
# or sm_90 (128x128 bf16 tiles spill on sm_80; fp32's tf32x3 holds three operand copies).
GEMM_CONFIG = {
    torch.float32: (128, 64, 32, 8, 3),
    torch.bfloat16: (128, 64, 64, 8, 3),
    torch.float16: (128, 64, 64, 8, 3),
}
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused GEMM2; BLOCK_M is one 8x8 tile. 8 warps: with 4, the
# pooling epilogue's reshapes push the fp32 tile past 255 registers.
POOL_GEMM_CONFIG = {torch.float32: (128, 32, 8, 3), torch.bfloat16: (128, 64, 8, 3), torch.float16: (128, 64, 8, 3)}

EPILOGUE_BIAS, EPILOGUE_BIAS_GELU, EPILOGUE_GELU_GRAD = 0, 1, 2


@triton.jit
def gemm_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    aux_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_bn,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_AUX: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    TF32X3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] with an epilogue; A's and C's rows are contiguous, aux/C share a layout.

    EPILOGUE 0: + bias. 1: + bias, GELU (aux <- pre-activation when STORE_AUX). 2: * GELU'(aux).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row blocks share each column block of B while it is in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    # 64-bit scalar tile bases + 32-bit in-tile offsets: int64 offset tensors would double the epilogue's registers
    m0 = pid_m * BLOCK_M
    local_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + m0.to(tl.int64) * stride_am
    rows = tl.where(m0 + local_m < M, local_m, 0)  # ragged rows read the tile's first row, never stored
    cols = tl.where(offs_n < N, offs_n, 0)
    a_offs = rows[:, None] * stride_am + offs_k[None, :]
    b_offs = offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = mainloop(a_tile, a_offs, b_ptr, b_offs, K, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, TF32X3)

    mask = (m0 + local_m[:, None] < M) & (offs_n[None, :] < N)
    c_tile = m0.to(tl.int64) * N
    c_offs = local_m[:, None] * N + offs_n[None, :]
    if EPILOGUE == 2:
        pre = tl.load(aux_ptr + c_tile + c_offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * gelu_grad(pre, APPROX_TANH)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            if STORE_AUX:
                tl.store(aux_ptr + c_tile + c_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            acc = gelu(acc, APPROX_TANH)
    tl.store(c_ptr + c_tile + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_pool_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    tile_ptr,
    D,
    K,
    G,
    TOTAL,
    stride_hm,
    stride_wn,
    OFF1,
    OFF2,
    OFF4,
    OFF8,
    HAS_BIAS: tl.constexpr,
    STORE_TILES: tl.constexpr,
    TF32X3: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n] <- pooled (h[n] @ w.T + bias) for one 8x8 spatial tile of image n and one block of D columns.

    OFF<k> is the first row of kernel k's scale inside an image's ``TOTAL`` output rows (-1: not requested).
    With STORE_TILES the tile's 8x8 mean also goes to ``tile_ptr`` (fp32) for the second reduction.
    """
    pid_t = tl.program_id(0)  # tiles vary fastest, so consecutive programs share w's column block in L2
    pid_n = tl.program_id(1)
    tiles_x = G // 8
    img = pid_t // (tiles_x * tiles_x)
    t = pid_t % (tiles_x * tiles_x)
    tile_y = t // tiles_x
    tile_x = t % tiles_x

    r = tl.arange(0, 64)
    p = (tile_y * 8 + r // 8) * G + tile_x * 8 + r % 8  # grid position of each tile row (row-major grid)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    cols = tl.where(n_mask, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_img = h_ptr + img.to(tl.int64) * G * G * stride_hm
    a_offs = p[:, None] * stride_hm + offs_k[None, :]
    b_offs = offs_k[:, None] + cols[None, :] * stride_wn
    acc = mainloop(a_img, a_offs, w_ptr, b_offs, K, 1, 64, BLOCK_N, BLOCK_K, TF32X3)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    dtype = out_ptr.dtype.element_ty
    out_img = out_ptr + img.to(tl.int64) * TOTAL * D  # 32-bit offsets below: TOTAL * D < 2^31
    if OFF1 >= 0:
        ptrs = out_img + (OFF1 + p)[:, None] * D + offs_n[None, :]
        tl.store(ptrs, acc.to(dtype), mask=n_mask[None, :])
    # rows are (y//2, y%2, x//2, x%2) in row-major order: summing the two parity axes gives 2x2 window sums
    s2 = tl.reshape(tl.sum(tl.sum(tl.reshape(acc, (4, 2, 4, 2, BLOCK_N)), axis=3), axis=1), (16, BLOCK_N))
    if OFF2 >= 0:
        j = tl.arange(0, 16)
        cells = (tile_y * 4 + j // 4) * (G // 2) + tile_x * 4 + j % 4
        ptrs = out_img + (OFF2 + cells)[:, None] * D + offs_n[None, :]
        tl.store(ptrs, (s2 * 0.25).to(dtype), mask=n_mask[None, :])
    s4 = tl.reshape(tl.sum(tl.sum(tl.reshape(s2, (2, 2, 2, 2, BLOCK_N)), axis=3), axis=1), (4, BLOCK_N))
    if OFF4 >= 0:
        j = tl.arange(0, 4)
        cells = (tile_y * 2 + j // 2) * (G // 4) + tile_x * 2 + j % 2
        ptrs = out_img + (OFF4 + cells)[:, None] * D + offs_n[None, :]
        tl.store(ptrs, (s4 * (1.0 / 16.0)).to(dtype), mask=n_mask[None, :])
    s8 = tl.sum(s4, axis=0) * (1.0 / 64.0)
    if OFF8 >= 0:
        tl.store(out_img + (OFF8 + tile_y * tiles_x + tile_x) * D + offs_n, s8.to(dtype), mask=n_mask)
    if STORE_TILES:
        tl.store(tile_ptr + pid_t.to(tl.int64) * D + offs_n, s8, mask=n_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _tf32x3(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b_transposed: bool,
    *,
    bias: torch.Tensor | None = None,
    epilogue: int = EPILOGUE_BIAS,
    aux: torch.Tensor | None = None,
    store_aux: bool = False,
    approximate: str = "none",
) -> torch.Tensor:
    """``a @ b.T`` (``b_transposed``: b is [N, K], an nn.Linear weight) or ``a @ b`` (b is [K, N]) + epilogue."""
    m, k = a.shape
    n = b.shape[0] if b_transposed else b.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if store_aux:
        aux = torch.empty_like(c)
    block_m, block_n, block_k, warps, stages = GEMM_CONFIG[a.dtype]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    gemm_kernel[grid](
        a,
        b,
        c if bias is None else bias,
        c,
        c if aux is None else aux,
        m,
        n,
        k,
        a.stride(0),
        *((1, b.stride(0)) if b_transposed else (b.stride(0), 1)),
        EPILOGUE=epilogue,
        HAS_BIAS=bias is not None,
        STORE_AUX=store_aux,
        APPROX_TANH=approximate == "tanh",
        TF32X3=_tf32x3(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )
    return (c, aux) if store_aux else c


def linear_gelu(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, approximate: str, keep_pre: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if keep_pre:
        return _gemm(x, w1, True, bias=b1, epilogue=EPILOGUE_BIAS_GELU, store_aux=True, approximate=approximate)
    return _gemm(x, w1, True, bias=b1, epilogue=EPILOGUE_BIAS_GELU, approximate=approximate), None


def linear_gelu_backward(grad_y: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, approximate: str) -> torch.Tensor:
    return _gemm(grad_y, w2, False, epilogue=EPILOGUE_GELU_GRAD, aux=pre, approximate=approximate)


def fused_plan(spec: MatryoshkaScales) -> tuple[dict[int, int], tuple[tuple[int, int], ...]] | None:
    """How the fused GEMM2 covers ``spec``: (kernel -> output offset for in-tile kernels 1/2/4/8,
    ((kernel / 8, offset), ...) for the second reduction), or None when the tiling does not apply."""
    if spec.grid % TILE:
        return None
    in_tile, super_tile = {}, []
    for k, off in zip(spec.kernels, spec.offsets):
        if k in TILE_LEVELS:
            in_tile[k] = off
        elif k % TILE == 0:
            super_tile.append((k // TILE, off))
        else:
            return None
    return in_tile, tuple(super_tile)


def linear_pool(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, spec: MatryoshkaScales) -> torch.Tensor:
    plan = fused_plan(spec)
    if plan is None:
        return pool(_gemm(h, w2, True, bias=b2), spec)
    in_tile, super_tile = plan
    m, k = h.shape
    d = w2.shape[0]
    n = m // spec.tokens_per_image
    tiles = (spec.grid // TILE) ** 2
    out = torch.empty(n, spec.total, d, device=h.device, dtype=h.dtype)
    tile_means = torch.empty(n, tiles, d, device=h.device, dtype=torch.float32) if super_tile else out
    block_n, block_k, warps, stages = POOL_GEMM_CONFIG[h.dtype]
    linear_pool_kernel[(n * tiles, triton.cdiv(d, block_n))](
        h,
        w2,
        out if b2 is None else b2,
        out,
        tile_means,
        d,
        k,
        spec.grid,
        spec.total,
        h.stride(0),
        w2.stride(0),
        *(in_tile.get(level, -1) for level in TILE_LEVELS),
        HAS_BIAS=b2 is not None,
        STORE_TILES=bool(super_tile),
        TF32X3=_tf32x3(h.dtype),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    if super_tile:  # second reduction: means of the tiles' 8x8 means
        pyramid(tile_means, out, spec.grid // TILE, super_tile)
    return out
