"""Every configuration the Triton launchers of fastnest/ops can choose, for the ahead-of-time GPU-readiness checks.

Built from the kernel modules' own config tables (block sizes, warps, stages). ``aligned`` names the integer
arguments the JIT sees as multiples of 16 at LLaVA's sizes (it specialises them, with every pointer): that build
vectorises and pipelines its loads, so it is the one whose registers and shared memory matter. No kernel makes
an architecture-specific choice, so ``arch`` does not change the lists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnest.constants import IGNORE_INDEX
from fastnest.ops.cross_entropy import triton as ce
from fastnest.ops.pooling import triton as pooling
from fastnest.ops.projector import triton as projector
from tools.aot import AotConfig

_TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _gemm_configs(dtype: torch.dtype, ty: str) -> list[AotConfig]:
    ptr = "*" + ty
    block_m, block_n, block_k, warps, stages = projector.GEMM_CONFIG[dtype]
    gemm_blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    gemm_sig = {name: ptr for name in ("a_ptr", "b_ptr", "bias_ptr", "c_ptr", "aux_ptr")}
    gemm_sig |= {name: "i32" for name in ("M", "N", "K", "stride_am")}
    precisions = (False, True) if dtype == torch.float32 else (False,)
    # (name, epilogue, B is an nn.Linear weight, bias, store aux, tanh) for GEMM1, plain GEMM2, GEMM2 backward
    variants = [
        (
            f"linear_gelu{'_bias' * bias}{'_pre' * aux}{'_tanh' * tanh}",
            projector.EPILOGUE_BIAS_GELU,
            True,
            bias,
            aux,
            tanh,
        )
        for bias in (False, True)
        for aux in (False, True)
        for tanh in (False, True)
    ]
    variants += [
        (f"linear{'_bias' * bias}", projector.EPILOGUE_BIAS, True, bias, False, False) for bias in (False, True)
    ]
    variants += [
        (f"gelu_backward{'_tanh' * t}", projector.EPILOGUE_GELU_GRAD, False, False, False, t) for t in (False, True)
    ]
    configs = []
    for name, epilogue, transposed, bias, aux, tanh in variants:
        for tf32x3 in precisions:
            unit_stride = {"stride_bk": 1} if transposed else {"stride_bn": 1}
            configs.append(
                AotConfig(
                    name=f"gemm:{name}:{ty}{':tf32x3' * tf32x3}",
                    fn=projector.gemm_kernel,
                    signature=gemm_sig | {"stride_bn" if transposed else "stride_bk": "i32"},
                    constexprs=unit_stride
                    | gemm_blocks
                    | {"EPILOGUE": epilogue, "HAS_BIAS": bias, "STORE_AUX": aux, "APPROX_TANH": tanh}
                    | {"TF32X3": tf32x3},
                    num_warps=warps,
                    num_stages=stages,
                    is_gemm=True,
                    aligned=(*gemm_sig, "stride_bn" if transposed else "stride_bk"),
                )
            )
    return configs


def _linear_pool_configs(dtype: torch.dtype, ty: str) -> list[AotConfig]:
    ptr = "*" + ty
    precisions = (False, True) if dtype == torch.float32 else (False,)
    block_n, block_k, warps, stages = projector.POOL_GEMM_CONFIG[dtype]
    aligned = ("h_ptr", "w_ptr", "bias_ptr", "out_ptr", "tile_ptr", "D", "K", "stride_hm", "stride_wn")
    return [
        AotConfig(
            name=f"linear_pool{'_bias' * bias}{'_tiles' * tiles}:{ty}{':tf32x3' * tf32x3}",
            fn=projector.linear_pool_kernel,
            signature={"h_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "tile_ptr": "*fp32"}
            | {n: "i32" for n in ("D", "K", "G", "TOTAL", "stride_hm", "stride_wn")}
            | {n: "i32" for n in ("OFF1", "OFF2", "OFF4", "OFF8")},
            constexprs={"HAS_BIAS": bias, "STORE_TILES": tiles, "TF32X3": tf32x3}
            | {"BLOCK_N": block_n, "BLOCK_K": block_k},
            num_warps=warps,
            num_stages=stages,
            is_gemm=True,
            aligned=aligned,
        )
        for bias in (False, True)
        for tiles in (False, True)
        for tf32x3 in precisions
    ]


def projector_configs(arch: int) -> list[AotConfig]:
    """GEMM1+GELU, plain GEMM2, the GELU-backward GEMM and the fused GEMM2+pool, per dtype."""
    del arch
    return [c for dtype, ty in _TL_TYPES.items() for c in (*_gemm_configs(dtype, ty), *_linear_pool_configs(dtype, ty))]


def pooling_configs(arch: int) -> list[AotConfig]:
    """The pyramid level (reading the GEMM output / earlier levels, or the fused kernel's fp32 tile means) and the fold."""
    del arch
    configs = []
    for ty in _TL_TYPES.values():
        ptr = "*" + ty
        for src in {ptr, "*fp32"}:
            configs.append(
                AotConfig(
                    name=f"pyramid_level:{src[1:]}->{ty}",
                    fn=pooling.pool_kernel,
                    signature={"src_ptr": src, "dst_ptr": ptr}
                    | {n: "i32" for n in ("D", "SRC_SIDE", "SRC_IMG_ROWS", "DST_IMG_ROWS", "K", "CELLS")},
                    constexprs={"BLOCK_C": pooling.BLOCK_C, "BLOCK_D": pooling.BLOCK_D},
                    aligned=("src_ptr", "dst_ptr", "D"),
                )
            )
        configs.append(
            AotConfig(
                name=f"fold:{ty}",
                fn=pooling.fold_kernel,
                signature={"grad_ptr": ptr, "dst_ptr": ptr, "kernels_ptr": "*i32", "offsets_ptr": "*i32"}
                | {n: "i32" for n in ("ROWS", "D", "G", "TOTAL", "NUM_SCALES")},
                constexprs={"BLOCK_P": pooling.BLOCK_P, "BLOCK_D": pooling.BLOCK_D},
                aligned=("grad_ptr", "dst_ptr", "kernels_ptr", "offsets_ptr", "ROWS", "D"),
            )
        )
    return configs


def cross_entropy_configs(arch: int) -> list[AotConfig]:
    """Every configuration ``ce_grad_`` can launch (logits dtype x block choice)."""
    del arch
    signature = {"row_stride": "i32", "targets_ptr": "*i64", "coef_ptr": "*fp32", "loss_ptr": "*fp32", "vocab": "i32"}
    return [
        AotConfig(
            name=f"ce_grad_{name}_v{block}",
            fn=ce.ce_grad_kernel,
            signature={"logits_ptr": f"*{name}"} | signature,
            constexprs={"IGNORE_INDEX": IGNORE_INDEX, "BLOCK_V": block},
            num_warps=warps,
            num_stages=ce.NUM_STAGES,
            is_gemm=False,
            # chunks start at multiples of 16 rows (fastnest.ops.cross_entropy.function.chunk_rows) and real
            # vocabularies are multiples of 16 (32000, 32064, 128256)
            aligned=("logits_ptr", "targets_ptr", "coef_ptr", "loss_ptr", "row_stride", "vocab"),
        )
        for name in ce.LOGIT_TYPES
        for block, warps in (ce.SMALL_VOCAB, ce.LARGE_VOCAB)
    ]


# Kernel module -> its configurations; tests/test_gpu_ready.py checks every fastnest/ops/*/triton.py is listed.
KERNEL_CONFIGS: dict[str, Callable[[int], list[AotConfig]]] = {
    "fastnest.ops.pooling.triton": pooling_configs,
    "fastnest.ops.projector.triton": projector_configs,
    "fastnest.ops.cross_entropy.triton": cross_entropy_configs,
}
KERNEL_MODULES: tuple[str, ...] = tuple(KERNEL_CONFIGS)
