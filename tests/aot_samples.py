"""Sample Triton kernels that prove the AOT tooling (tools/aot.py) before and beside the real kernels.

A bf16 GEMM with a bias epilogue (must use tensor cores), an elementwise kernel (no GEMM), and a configuration that
must spill (a 128x64 fp32 accumulator held by a single warp: 256 registers per thread, one more than exist).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tools.aot import AotConfig


@triton.jit
def matmul_bias_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask = (rm[:, None] < M) & (k0 + rk[None, :] < K)
        b_mask = (k0 + rk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk[None, :]) * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + (k0 + rk[:, None]) * stride_bk + rn[None, :] * stride_bn, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc)
    acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < n)


MATMUL_SIGNATURE = {
    "a_ptr": "*bf16",
    "b_ptr": "*bf16",
    "bias_ptr": "*bf16",
    "c_ptr": "*bf16",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "stride_am": "i32",
    "stride_bk": "i32",
    "stride_cm": "i32",
}
# Row-major operands: the inner strides are 1, which the JIT turns into constants.
UNIT_STRIDES = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1}
# Row strides and K that are multiples of 16 (as LLaVA's hidden sizes are): the JIT marks them divisible by 16, which
# lets the loads vectorize and the K loop pipeline through shared memory.
ALIGNED = ("a_ptr", "b_ptr", "bias_ptr", "c_ptr", "stride_am", "stride_bk", "stride_cm", "K")


def matmul_config(name: str, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> AotConfig:
    return AotConfig(
        name=name,
        fn=matmul_bias_kernel,
        signature=MATMUL_SIGNATURE,
        constexprs={**UNIT_STRIDES, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
        num_warps=num_warps,
        num_stages=num_stages,
        is_gemm=True,
        aligned=ALIGNED,
    )


def aot_configs(arch: int) -> list[AotConfig]:
    return [
        matmul_config("sample_matmul_bias_128x128x64", 128, 128, 64, num_warps=8, num_stages=3),
        AotConfig(
            name="sample_gelu_1024",
            fn=gelu_kernel,
            signature={"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32"},
            constexprs={"BLOCK": 1024},
            num_warps=4,
            num_stages=1,
        ),
    ]


def spilling_config() -> AotConfig:
    return matmul_config("sample_matmul_one_warp_spills", 128, 64, 16, num_warps=1, num_stages=1)
