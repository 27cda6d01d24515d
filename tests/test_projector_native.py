"""The native CPU projector and pooling functions (fastnest/ops/{projector,pooling}/native.py, fastnest._C) against float64 PyTorch.

Skipped only when the extension is not built (the skip reason says why); CI builds it, so these run there.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fastnest.dispatch import native_available, native_error
from fastnest.scales import DEFAULT_SCALES, MatryoshkaScales

pytestmark = pytest.mark.skipif(not native_available(), reason=str(native_error()))

if native_available():
    from fastnest.ops.pooling import native as pool_native
    from fastnest.ops.projector import native

# Outputs are rounded to the dtype once or twice (GEMM result, then the GELU or the mean); values are O(1).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
DTYPES = list(TOL)
APPROXIMATE = ("none", "tanh")

# Every non-empty subset of the default 24x24 scales, plus SigLIP's 27x27 grid, a small odd grid, and sets whose
# kernels (3, 6, 12; 2, 3, 6) exercise the pyramid's choice of the finer level to sum from.
SUBSETS_24 = [s for r in range(1, 6) for s in itertools.combinations(DEFAULT_SCALES, r)]
SPECS = [(27, (729, 81, 9, 1)), (27, (9, 729, 1, 81)), (6, (36, 9, 4, 1)), (6, (9, 4, 1)), (24, (16, 4, 64))]
SPEC_IDS = [f"g{g}-{'-'.join(map(str, s))}" for g, s in SPECS]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --- float64 references, written from the definitions -----------------------------------------------------------


def ref_linear_gelu(x, w1, b1, approximate):
    pre = F.linear(x.double(), w1.double(), None if b1 is None else b1.double())
    return F.gelu(pre, approximate=approximate), pre


def ref_pool(y, spec: MatryoshkaScales):
    """avg_pool2d of each scale on the [N, D, G, G] view of y [N*G*G, D], concatenated in spec order."""
    g = spec.grid
    image = y.reshape(-1, g, g, y.shape[1]).permute(0, 3, 1, 2)
    out = []
    for s in spec.scales:
        k = g // math.isqrt(s)
        out.append(F.avg_pool2d(image, kernel_size=k, stride=k).flatten(2).transpose(1, 2))
    return torch.cat(out, dim=1)


def ref_linear_pool(h, w2, b2, spec):
    return ref_pool(F.linear(h.double(), w2.double(), None if b2 is None else b2.double()), spec)


def ref_fold(grad_out, spec):
    """The pooling's adjoint, by autograd through the reference pooling."""
    n, _, d = grad_out.shape
    y = torch.zeros(n * spec.tokens_per_image, d, dtype=torch.float64, requires_grad=True)
    (grad_y,) = torch.autograd.grad(ref_pool(y, spec), y, grad_out.double())
    return grad_y


def ref_linear_gelu_backward(grad_y, w2, pre, approximate):
    pre = pre.double().requires_grad_()
    (grad_pre,) = torch.autograd.grad(F.gelu(pre, approximate=approximate), pre, grad_y.double() @ w2.double())
    return grad_pre


def assert_close(out, ref, dtype):
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


# --- linear_gelu -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("keep_pre", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu(dtype, approximate, keep_pre, bias):
    m, k, hidden = 37, 19, 45  # hidden not a multiple of a vector width
    x = randn(m, k, dtype=dtype, scale=1.0, seed=1)
    w1 = randn(hidden, k, dtype=dtype, scale=2 / math.sqrt(k), seed=2)  # pre-activations spread over [-6, 6]
    b1 = randn(hidden, dtype=dtype, seed=3) if bias else None
    h, pre = native.linear_gelu(x, w1, b1, approximate, keep_pre)
    ref_h, ref_pre = ref_linear_gelu(x, w1, b1, approximate)
    assert h.shape == (m, hidden)
    assert_close(h, ref_h, dtype)
    if keep_pre:
        assert_close(pre, ref_pre, dtype)
        # h is exactly the GELU of the kept (rounded) pre-activation
        assert_close(h, F.gelu(pre.double(), approximate=approximate), dtype)
    else:
        assert pre is None


@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gelu_float32_over_its_range(approximate):
    """Both tails and zero: the float32 exp/erfc approximations against float64 GELU of the same inputs."""
    x = torch.cat([torch.linspace(-12, 12, 24_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0])])
    h, _ = native.linear_gelu(x[:, None], torch.ones(1, 1), None, approximate, False)
    torch.testing.assert_close(h[:, 0].double(), F.gelu(x.double(), approximate=approximate), rtol=3e-6, atol=1e-7)
    grad = native.linear_gelu_backward(torch.ones(x.numel(), 1), torch.ones(1, 1), x[:, None], approximate)
    ref = ref_linear_gelu_backward(torch.ones(x.numel(), 1), torch.ones(1, 1), x[:, None], approximate)
    torch.testing.assert_close(grad.double(), ref, rtol=3e-6, atol=3e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gelu_propagates_nan(dtype, approximate):
    x = torch.tensor([[1.0], [float("nan")], [-1.0]], dtype=dtype)
    h, _ = native.linear_gelu(x, torch.ones(1, 1, dtype=dtype), None, approximate, False)
    assert h[:, 0].isnan().tolist() == [False, True, False]
    g = native.linear_gelu_backward(torch.ones(3, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype), x, approximate)
    assert g[:, 0].isnan().tolist() == [False, True, False]


# --- linear_pool and fold ----------------------------------------------------------------------------------------


def check_linear_pool(grid, scales, dtype, n, hidden, d, bias=True, seed=0):
    spec = MatryoshkaScales(grid, scales)
    h = randn(n * grid * grid, hidden, dtype=dtype, seed=seed)
    w2 = randn(d, hidden, dtype=dtype, scale=1 / math.sqrt(hidden), seed=seed + 1)
    b2 = randn(d, dtype=dtype, seed=seed + 2) if bias else None
    out = native.linear_pool(h, w2, b2, spec)
    assert out.shape == (n, spec.total, d)
    assert_close(out, ref_linear_pool(h, w2, b2, spec), dtype)


def check_pool(grid, scales, dtype, n, d, seed=0):
    spec = MatryoshkaScales(grid, scales)
    y = randn(n * grid * grid, d, dtype=dtype, seed=seed)
    out = pool_native.pool(y, spec)
    assert out.shape == (n, spec.total, d)
    assert_close(out, ref_pool(y.double(), spec), dtype)


def check_fold(grid, scales, dtype, n, d, seed=0):
    spec = MatryoshkaScales(grid, scales)
    grad_out = randn(n, spec.total, d, dtype=dtype, seed=seed)
    grad_y = pool_native.fold(grad_out, spec)
    assert grad_y.shape == (n * grid * grid, d)
    assert_close(grad_y, ref_fold(grad_out, spec), dtype)


@pytest.mark.parametrize("scales", SUBSETS_24, ids=lambda s: "-".join(map(str, s)))
def test_linear_pool_every_default_subset(scales):
    n = 1 + len(scales) % 3
    check_linear_pool(24, scales, torch.float32, n=n, hidden=6, d=13, bias=len(scales) % 2 == 1)


@pytest.mark.parametrize("scales", SUBSETS_24, ids=lambda s: "-".join(map(str, s)))
def test_pool_every_default_subset(scales):
    check_pool(24, scales, torch.float32, n=1 + len(scales) % 3, d=13)


@pytest.mark.parametrize("scales", SUBSETS_24, ids=lambda s: "-".join(map(str, s)))
def test_fold_every_default_subset(scales):
    check_fold(24, scales, torch.float32, n=1 + len(scales) % 3, d=13)


@pytest.mark.parametrize("grid, scales", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_linear_pool_grids_and_dtypes(grid, scales, dtype, n):
    check_linear_pool(grid, scales, dtype, n=n, hidden=10, d=21, seed=n)


@pytest.mark.parametrize("grid, scales", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_pool_and_fold_grids_and_dtypes(grid, scales, dtype, n):
    check_pool(grid, scales, dtype, n=n, d=21, seed=n)
    check_fold(grid, scales, dtype, n=n, d=21, seed=n)


@pytest.mark.parametrize("scales", [DEFAULT_SCALES, (144, 9, 1)], ids=["with-576", "without-576"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_pool_wide_channels(scales, dtype):
    """Channel counts above the kernels' 256-channel block, with a ragged last block (both GEMM orders)."""
    check_linear_pool(24, scales, dtype, n=2, hidden=300, d=270)
    check_pool(24, scales, dtype, n=2, d=270)
    check_fold(24, scales, dtype, n=2, d=270)


# --- linear_gelu_backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_linear_gelu_backward(dtype, approximate):
    m, hidden, d = 41, 23, 17
    grad_y = randn(m, d, dtype=dtype, seed=4)
    w2 = randn(d, hidden, dtype=dtype, scale=1 / math.sqrt(d), seed=5)
    pre = randn(m, hidden, dtype=dtype, scale=3.0, seed=6)
    grad_pre = native.linear_gelu_backward(grad_y, w2, pre, approximate)
    assert grad_pre.shape == (m, hidden)
    assert_close(grad_pre, ref_linear_gelu_backward(grad_y, w2, pre, approximate), dtype)


# --- non-contiguous inputs: accepted, same result as their contiguous copies ---------------------------------------


def test_non_contiguous_inputs_match_contiguous():
    spec = MatryoshkaScales(6, (36, 9, 1))
    n, k, hidden, d = 2, 5, 7, 9
    x = randn(k, n * 36, seed=7).t()  # transposed view
    w1 = randn(hidden, 2 * k, seed=8)[:, ::2]  # strided columns
    b1 = randn(2 * hidden, seed=9)[::2]
    h, pre = native.linear_gelu(x, w1, b1, "none", True)
    h_ref, pre_ref = native.linear_gelu(x.contiguous(), w1.contiguous(), b1.contiguous(), "none", True)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(pre, pre_ref)

    w2 = randn(hidden, d, seed=10).t()
    b2 = randn(d, 2, seed=11)[:, 0]
    h_t = h.t().contiguous().t()  # column-major h
    for s in (spec, MatryoshkaScales(6, (9, 1))):  # GEMM-then-pool and pool-then-GEMM
        out = native.linear_pool(h_t, w2, b2, s)
        torch.testing.assert_close(out, native.linear_pool(h.contiguous(), w2.contiguous(), b2.contiguous(), s))

    y = randn(d, n * 36, seed=13).t()
    torch.testing.assert_close(pool_native.pool(y, spec), pool_native.pool(y.contiguous(), spec))

    grad_out = torch.ones(1, 1, 1).expand(n, spec.total, d)  # what autograd hands over for out.sum()
    torch.testing.assert_close(pool_native.fold(grad_out, spec), pool_native.fold(grad_out.contiguous(), spec))

    grad_y = randn(d, n * 36, seed=12).t()
    pre_t = pre.t().contiguous().t()
    grad_pre = native.linear_gelu_backward(grad_y, w2, pre_t, "tanh")
    torch.testing.assert_close(
        grad_pre, native.linear_gelu_backward(grad_y.contiguous(), w2.contiguous(), pre.contiguous(), "tanh")
    )


# --- bad input ---------------------------------------------------------------------------------------------------


def _bad_calls():
    spec = MatryoshkaScales(6, (36, 9))
    x, w1, b1 = torch.randn(72, 4), torch.randn(5, 4), torch.randn(5)
    h, w2, b2 = torch.randn(72, 5), torch.randn(3, 5), torch.randn(3)
    grad_out, pre = torch.randn(2, 45, 3), torch.randn(72, 5)
    return [
        ("approximate must be one of", lambda: native.linear_gelu(x, w1, b1, "erf", True)),
        ("x must be 2-D", lambda: native.linear_gelu(x[None], w1, b1, "none", True)),
        ("x must not be empty", lambda: native.linear_gelu(x[:0], w1, b1, "none", True)),
        ("x has dtype torch.int64", lambda: native.linear_gelu(x.long(), w1, b1, "none", True)),
        ("w1 has dtype torch.float64", lambda: native.linear_gelu(x, w1.double(), b1, "none", True)),
        (r"w1 must be \[H, 4\]", lambda: native.linear_gelu(x, w1[:, :3], b1, "none", True)),
        (r"b1 must have shape \(5,\)", lambda: native.linear_gelu(x, w1, b1[:4], "none", True)),
        ("x must be a torch.Tensor", lambda: native.linear_gelu(x.numpy(), w1, b1, "none", True)),
        ("must be a CPU tensor", lambda: native.linear_gelu(x.to("meta"), w1, b1, "none", True)),
        ("spec must be a fastnest.MatryoshkaScales", lambda: native.linear_pool(h, w2, b2, (36, 9))),
        (r"h must have N\*36 rows", lambda: native.linear_pool(h[:70], w2, b2, spec)),
        (r"w2 must be \[D, 5\]", lambda: native.linear_pool(h, w2[:, :4], b2, spec)),
        (r"b2 must have shape \(3,\)", lambda: native.linear_pool(h, w2, b2[:2], spec)),
        ("b2 has dtype torch.float16", lambda: native.linear_pool(h, w2, b2.half(), spec)),
        (r"y must have N\*36 rows", lambda: pool_native.pool(h[:71], spec)),
        ("y must be 2-D", lambda: pool_native.pool(grad_out, spec)),
        ("spec must be a fastnest.MatryoshkaScales", lambda: pool_native.pool(h, 6)),
        (r"grad_out must be \[N, 45, D\]", lambda: pool_native.fold(grad_out[:, :44], spec)),
        ("grad_out must be 3-D", lambda: pool_native.fold(grad_out[0], spec)),
        ("spec must be a fastnest.MatryoshkaScales", lambda: pool_native.fold(grad_out, None)),
        (r"w2 must be \[2, H\]", lambda: native.linear_gelu_backward(grad_out[0, :, :2], w2, pre, "none")),
        (r"pre must have shape \(72, 5\)", lambda: native.linear_gelu_backward(h[:, :3], w2, pre[:71], "none")),
        ("pre has dtype torch.bfloat16", lambda: native.linear_gelu_backward(h[:, :3], w2, pre.bfloat16(), "none")),
        ("approximate must be one of", lambda: native.linear_gelu_backward(h[:, :3], w2, pre, "fast")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises(case):
    match, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_extension_rejects_bad_arguments():
    """The raw module's own checks (a wrong call must not reach the kernels)."""
    from fastnest import _C

    y = torch.randn(36, 4)
    out = torch.empty(1, 9, 4)
    with pytest.raises(ValueError, match="does not divide grid"):
        _C.pool(y.data_ptr(), 0, out.data_ptr(), 1, 6, 4, [4], [0], 9, 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        _C.pool(y.data_ptr(), 0, out.data_ptr(), 1, 6, 4, [2], [1], 9, 0, 1)
    with pytest.raises(ValueError, match="dtype code 7"):
        _C.fold(out.data_ptr(), y.data_ptr(), 1, 6, 4, [2], [0], 9, 7, 1)
    with pytest.raises(ValueError, match="same length"):
        _C.fold(out.data_ptr(), y.data_ptr(), 1, 6, 4, [2], [0, 1], 9, 0, 1)
    with pytest.raises(ValueError, match="non-null"):
        _C.gelu_backward(0, y.data_ptr(), 144, 0, 0, 1)


# --- the four functions composed: forward and backward of the projector ------------------------------------------


class NativeProjector(torch.autograd.Function):
    """out = pool(gelu(x @ w1.T + b1) @ w2.T + b2) with the native functions forward and backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, spec, approximate):
        h, pre = native.linear_gelu(x, w1, b1, approximate, True)
        ctx.save_for_backward(x, w1, w2, h, pre)
        ctx.spec, ctx.approximate = spec, approximate
        return native.linear_pool(h, w2, b2, spec)

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2, h, pre = ctx.saved_tensors
        grad_y = pool_native.fold(grad_out, ctx.spec)
        grad_pre = native.linear_gelu_backward(grad_y, w2, pre, ctx.approximate)
        return grad_pre @ w1, grad_pre.t() @ x, grad_pre.sum(0), grad_y.t() @ h, grad_y.sum(0), None, None


def projector_inputs(n, grid, k, hidden, d, dtype, seed=0):
    shapes = [(n * grid * grid, k), (hidden, k), (hidden,), (d, hidden), (d,)]
    return [randn(*s, dtype=dtype, seed=seed + i).requires_grad_() for i, s in enumerate(shapes)]


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("scales", [(36, 9, 4, 1), (9, 4, 1)], ids=["with-36", "without-36"])
def test_gradcheck(approximate, scales):
    spec = MatryoshkaScales(6, scales)
    inputs = projector_inputs(2, 6, k=3, hidden=5, d=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: NativeProjector.apply(*a, spec, approximate), inputs, fast_mode=True)


def test_float32_forward_backward_matches_reference():
    spec = MatryoshkaScales(24, DEFAULT_SCALES)
    inputs = projector_inputs(2, 24, k=8, hidden=33, d=19, dtype=torch.float32, seed=20)
    grad_out = randn(2, spec.total, 19, seed=30)
    out = NativeProjector.apply(*inputs, spec, "none")
    grads = torch.autograd.grad(out, inputs, grad_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    x, w1, b1, w2, b2 = ref_inputs
    ref_out = ref_linear_pool(F.gelu(F.linear(x, w1, b1)), w2, b2, spec)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())
    assert_close(out.detach(), ref_out.detach(), torch.float32)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)
