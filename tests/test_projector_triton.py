"""The Triton projector kernels (in Triton's interpreter without CUDA) against float64 references."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastnest.ops.pooling import triton as pool_triton
from fastnest.ops.projector import triton as pt
from fastnest.ops.projector.function import matryoshka_project
from fastnest.ops.projector.naive import reference_pool, reference_project
from fastnest.scales import DEFAULT_SCALES, MatryoshkaScales

# relative to the largest entry of the compared tensor: bf16/fp16 round the GELU output before GEMM2
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    assert got.shape == want.shape, what
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def check_linear_pool_and_fold(grid, scales, n, k, d, dtype=torch.float32, bias=True, seed=0):
    spec = MatryoshkaScales(grid, scales)
    h = randn(n * grid * grid, k, dtype=dtype, seed=seed)
    w2 = randn(d, k, dtype=dtype, seed=seed + 1, scale=k**-0.5)
    b2 = randn(d, dtype=dtype, seed=seed + 2) if bias else None
    out = pt.linear_pool(h, w2, b2, spec)
    y = F.linear(h.double(), w2.double(), None if b2 is None else b2.double()).view(n, grid * grid, d)
    close(out, reference_pool(y, grid, scales), TOL[dtype], f"linear_pool {grid} {scales}")

    grad_out = randn(n, spec.total, d, dtype=dtype, seed=seed + 3)
    y = y.detach().requires_grad_(True)
    (reference_pool(y, grid, scales) * grad_out.double()).sum().backward()  # the adjoint, by autograd
    close(pool_triton.fold(grad_out, spec), y.grad.view(-1, d), TOL[dtype], f"fold {grid} {scales}")


SUBSETS = [s for r in range(1, 6) for s in itertools.combinations(DEFAULT_SCALES, r)]


@pytest.mark.parametrize("scales", SUBSETS, ids=lambda s: "-".join(map(str, s)))
def test_fused_linear_pool_every_subset(scales):
    assert pt.fused_plan(MatryoshkaScales(24, scales)) is not None
    check_linear_pool_and_fold(24, scales[::-1] if len(scales) % 2 else scales, n=1, k=24, d=40)


@pytest.mark.parametrize(
    "grid, scales, fused",
    [
        (24, (576, 16, 64, 1), False),  # kernels 6 and 3 straddle the 8x8 tiles
        (24, (4, 36), False),  # kernel 12
        (27, (729, 81, 9, 1), False),  # SigLIP: no power-of-two tiling
        (6, (36, 9, 4, 1), False),
        (16, (256, 64, 16, 4, 1), True),  # CLIP-L/224: kernels 8 and 16 -> one second-reduction level
        (8, (1, 64, 4), True),  # one tile per image
    ],
)
def test_linear_pool_other_grids(grid, scales, fused):
    assert (pt.fused_plan(MatryoshkaScales(grid, scales)) is not None) == fused
    check_linear_pool_and_fold(grid, scales, n=2, k=20, d=36, seed=grid)


@pytest.mark.parametrize("grid, scales", [(24, DEFAULT_SCALES), (6, (36, 9, 4, 1))])
def test_linear_pool_second_feature_block(grid, scales):
    check_linear_pool_and_fold(grid, scales, n=1, k=20, d=136)  # D spans a partial second block of 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_and_backward(dtype, approximate, bias):
    m, k, h_dim, d = 130, 70, 72, 66  # none of them a multiple of the blocks
    x = randn(m, k, dtype=dtype, seed=1)
    w1 = randn(h_dim, k, dtype=dtype, seed=2, scale=k**-0.5)
    b1 = randn(h_dim, dtype=dtype, seed=3) if bias else None
    pre_ref = F.linear(x.double(), w1.double(), None if b1 is None else b1.double())
    h, pre = pt.linear_gelu(x, w1, b1, approximate, keep_pre=True)
    close(pre, pre_ref, TOL[dtype], "pre-activation")
    close(h, F.gelu(pre_ref, approximate=approximate), TOL[dtype], "gelu")
    h_only, none = pt.linear_gelu(x, w1, b1, approximate, keep_pre=False)
    assert none is None and torch.equal(h_only, h)

    grad_y = randn(m, d, dtype=dtype, seed=4)
    w2 = randn(d, h_dim, dtype=dtype, seed=5, scale=h_dim**-0.5)
    p = pre.double().requires_grad_(True)
    (F.gelu(p, approximate=approximate) * (grad_y.double() @ w2.double())).sum().backward()
    close(pt.linear_gelu_backward(grad_y, w2, pre, approximate), p.grad, TOL[dtype], "gelu backward")


CASES = [  # (n, grid, scales, approximate, bias)
    (1, 24, DEFAULT_SCALES, "none", True),
    (2, 24, (144, 1), "tanh", False),
    (1, 27, (729, 81, 9, 1), "tanh", True),
    (3, 6, (36, 9, 4, 1), "none", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, grid, scales, approximate, bias", CASES)
def test_project_forward_backward(dtype, n, grid, scales, approximate, bias):
    k, h_dim, d = 24, 48, 40
    proj = torch.nn.Sequential(
        torch.nn.Linear(k, h_dim, bias=bias),
        torch.nn.GELU(approximate=approximate),
        torch.nn.Linear(h_dim, d, bias=bias),
    ).to(dtype)
    x = randn(n, grid * grid, k, dtype=dtype, seed=n).requires_grad_(True)
    out = matryoshka_project(x, proj, scales, backend="triton")
    assert out.dtype == dtype and out.shape == (n, sum(scales), d)

    l1, l2 = proj[0], proj[2]
    params = [l1.weight, l1.bias, l2.weight, l2.bias]
    ref_inputs = [t.detach().double().requires_grad_(True) if t is not None else None for t in [x, *params]]
    ref = reference_project(*ref_inputs, approximate, grid, scales)
    close(out, ref, TOL[dtype], "forward")

    grad_out = randn(*out.shape, dtype=dtype, seed=7)
    out.backward(grad_out)
    (ref * grad_out.double()).sum().backward()
    for name, got, want in zip(["x", "w1", "b1", "w2", "b2"], [x, *params], ref_inputs):
        if want is None:
            assert got is None
            continue
        assert got.grad.dtype == dtype
        close(got.grad, want.grad, TOL[dtype], f"grad {name}")


def test_non_contiguous_input():
    grid, k = 24, 16
    proj = torch.nn.Sequential(torch.nn.Linear(k, 32), torch.nn.GELU(), torch.nn.Linear(32, 24))
    x = randn(2, k, grid * grid, seed=3).transpose(1, 2).requires_grad_(True)  # [N, T, K] view
    assert not x.is_contiguous()
    out = matryoshka_project(x, proj, (576, 9, 1), backend="triton")
    ref_x = x.detach().double().requires_grad_(True)
    ref = reference_project(
        ref_x, proj[0].weight, proj[0].bias, proj[2].weight, proj[2].bias, "none", grid, (576, 9, 1)
    )
    close(out, ref, TOL[torch.float32])
    grad_out = randn(*out.shape, seed=4)
    out.backward(grad_out)
    (ref * grad_out.double()).sum().backward()
    close(x.grad, ref_x.grad, TOL[torch.float32], "grad x")


def test_plan_of_the_default_scales():
    spec = MatryoshkaScales(24, DEFAULT_SCALES)  # kernels 24, 8, 4, 2, 1 at offsets 0, 1, 10, 46, 190
    in_tile, super_tile = pt.fused_plan(spec)
    assert in_tile == {8: 1, 4: 10, 2: 46, 1: 190}
    assert super_tile == ((3, 0),)  # the whole-image mean: a 3x3 mean of the 8x8 tile means
