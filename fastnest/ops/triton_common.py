"""Triton helpers shared by the kernel files: tanh, GELU and its derivative, the dot product and a GEMM main loop."""

from __future__ import annotations

import triton
import triton.language as tl

from ..dispatch import triton_interpreting

INTERPRET_BF16_DOT_AS_FP32 = tl.constexpr(triton_interpreting())


@triton.jit
def tanh(x):
    # tanh without overflow: exp(-2|x|) <= 1
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def gelu(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def dot(a, b, acc, TF32X3: tl.constexpr):
    if TF32X3:  # fp32 inputs when torch disallows TF32: three TF32 products, fp32-accurate, still on tensor cores
        return tl.dot(a, b, acc, input_precision="tf32x3")
    elif INTERPRET_BF16_DOT_AS_FP32 and a.dtype == tl.bfloat16:
        # Triton 3.9's interpreter multiplies bf16 bit patterns as integers; bf16 products are exact in fp32,
        # so this is the same fp32-accumulated result the tensor cores give. Never taken when compiled.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mainloop(
    a_ptr,
    a_offs,
    b_ptr,
    b_offs,
    K,
    stride_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TF32X3: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = A @ B over K; A's rows are contiguous in K, B moves ``stride_bk`` per k."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptr + a_offs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptr + b_offs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = dot(a, b, acc, TF32X3)
        a_offs += BLOCK_K
        b_offs += BLOCK_K * stride_bk
    return acc
