"""The decoder's fused elementwise ops as autograd Functions, and their entry points by backend: ``"native"``
(fastnest._C, CPU) or ``"torch"`` (the references in naive.py, any device). Liger-Kernel's Triton versions of the
same ops (CUDA) are applied by fastnest/hf/lm_kernels.py."""

from __future__ import annotations

import torch

from . import naive, native

BACKENDS = ("native", "torch")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = native.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = native.rms_norm_backward(dy, x, weight, rstd)
        return dx, dw if ctx.needs_input_grad[1] else None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return native.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        return native.swiglu_backward(dh, *ctx.saved_tensors)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return native.rotary(q, cos, sin), native.rotary(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return native.rotary(dq, cos, sin, backward=True), native.rotary(dk, cos, sin, backward=True), None, None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"decoder op backend {backend!r} is not one of {BACKENDS}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "native") -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm of ``x [..., D]`` with ``weight [D]``, in their promoted dtype (x's dtype
    when they match, as in a Llama's fp32 residual stream)."""
    _check_backend(backend)
    if backend == "torch":
        return naive.rms_norm(x, weight, eps)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return _RMSNorm.apply(x.to(dtype), weight.to(dtype), float(eps))


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "native") -> torch.Tensor:
    """``silu(gate) * up``, one dtype (under autocast the projections' output dtype)."""
    _check_backend(backend)
    if backend == "torch":
        return naive.swiglu(gate, up)
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share one dtype, got {gate.dtype} and {up.dtype}")
    return _SwiGLU.apply(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` on tokens-major ``q [T, H, d]``, ``k [T, Hkv, d]`` with ``cos``,
    ``sin [T, d]``, in the promoted dtype of q and cos (under bf16 autocast: fp32 cos, so fp32 q and k, as in
    Hugging Face). cos and sin take no gradient (the rotary embedding computes them without one)."""
    _check_backend(backend)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin require grad; the fused rotary embedding treats them as constants")
    if backend == "torch":
        return naive.rotary(q, cos, sin), naive.rotary(k, cos, sin)
    dtype = torch.promote_types(q.dtype, cos.dtype)
    q, k, cos, sin = (t.to(dtype) for t in (q, k, cos, sin))
    return _Rotary.apply(q, k, cos, sin)
