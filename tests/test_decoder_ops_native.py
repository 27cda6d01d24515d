"""The native fused RMSNorm, SwiGLU and rotary kernels (fastnest/ops/decoder) against plain statements of the
functions: forward and backward in fp32 against the Hugging Face-style references, fp64 backward by gradcheck
(numerical differentiation), half dtypes within their rounding, and the wrappers' errors."""

from __future__ import annotations

import pytest
import torch

from fastnest.dispatch import native_available
from fastnest.ops.decoder import function, naive

pytestmark = pytest.mark.skipif(not native_available(), reason="the native extension fastnest._C is not built")


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs], [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(7, 33), (300, 256), (2, 5, 64)])
def test_rms_norm_matches_reference_fp32(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    dy = torch.randn(*shape, generator=g)
    out, grads = _grads(lambda a, b: function.rms_norm(a, b, 1e-6), [x, w], (dy,))
    ref_out, ref_grads = _grads(lambda a, b: naive.rms_norm(a, b, 1e-6), [x, w], (dy,))
    torch.testing.assert_close(out[0], ref_out[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_rms_norm_fp64_against_formula_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, generator=g, dtype=torch.float64, requires_grad=True)
    formula = w * x / torch.sqrt((x * x).sum(-1, keepdim=True) / 17 + 1e-5)  # hand statement, in fp64
    torch.testing.assert_close(function.rms_norm(x, w, 1e-5), formula, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: function.rms_norm(a, b, 1e-5), (x, w))


def test_swiglu_matches_reference_fp32():
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(37, 688, generator=g) * 5  # both tails of the sigmoid
    up, dh = torch.randn(37, 688, generator=g), torch.randn(37, 688, generator=g)
    out, grads = _grads(function.swiglu, [gate, up], (dh,))
    ref_out, ref_grads = _grads(naive.swiglu, [gate, up], (dh,))
    torch.testing.assert_close(out[0], ref_out[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_swiglu_fp64_against_formula_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    formula = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(function.swiglu(gate, up), formula, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(function.swiglu, (gate, up))


def _rotary_formula(x, cos, sin):
    """Per head: [x1 c1 - x2 s1, x2 c2 + x1 s2] over the halves (Hugging Face's x cos + rotate_half(x) sin)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]], -1)


def test_rotary_matches_reference_with_grouped_kv_and_strided_input():
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(50, 8 + 2 + 2, 32, generator=g)  # one projection's output: q, k and v heads per token
    q, k = qkv[:, :8], qkv[:, 8:10]  # token stride 12 heads: the kernel reads them in place
    cos, sin = torch.randn(50, 32, generator=g), torch.randn(50, 32, generator=g)
    dq, dk = torch.randn(50, 8, 32, generator=g), torch.randn(50, 2, 32, generator=g)
    out, grads = _grads(lambda a, b: function.rotary(a, b, cos, sin), [q, k], (dq, dk))
    ref_out, ref_grads = _grads(
        lambda a, b: (_rotary_formula(a, cos, sin), _rotary_formula(b, cos, sin)), [q, k], (dq, dk)
    )
    for got, want in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0], naive.rotary(q, cos, sin), rtol=1e-6, atol=1e-6)


def test_rotary_fp64_gradcheck():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: function.rotary(a, b, cos, sin), (q, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_within_rounding(dtype):
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(40, 64, generator=g), torch.randn(64, generator=g)
    gate, up = torch.randn(40, 64, generator=g) * 3, torch.randn(40, 64, generator=g)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(
        function.rms_norm(x.to(dtype), w.to(dtype), 1e-6).float(), naive.rms_norm(x, w, 1e-6), **tol
    )
    torch.testing.assert_close(function.swiglu(gate.to(dtype), up.to(dtype)).float(), naive.swiglu(gate, up), **tol)
    q, cos, sin = x.view(40, 2, 32), w[:32].expand(40, 32), w[32:].expand(40, 32)
    got, _ = function.rotary(q.to(dtype), q.to(dtype), cos.to(dtype), sin.to(dtype))
    torch.testing.assert_close(got.float(), naive.rotary(q, cos, sin), **tol)


def test_rotary_promotes_to_fp32_cos_as_hugging_face():
    """Under bf16 autocast the projections are bf16 and cos/sin fp32: q * cos is fp32 in Hugging Face."""
    q = torch.randn(4, 2, 8).to(torch.bfloat16)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    got, _ = function.rotary(q, q, cos, sin)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive.rotary(q.float(), cos, sin), rtol=1e-6, atol=1e-6)


def test_errors_name_the_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        function.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="up must have shape"):
        function.swiglu(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="gate and up must share one dtype"):
        function.swiglu(x, x.double())
    with pytest.raises(ValueError, match="head dimension must be even"):
        function.rotary(torch.randn(4, 2, 7), torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"cos must have shape \(4, 8\)"):
        function.rotary(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="cos and sin require grad"):
        function.rotary(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 8, requires_grad=True), x)
    with pytest.raises(ValueError, match=r"backend 'triton' is not one of \('native', 'torch'\)"):
        function.swiglu(x, x, backend="triton")
