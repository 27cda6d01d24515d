"""multiscale_pool and matryoshka_project against F.avg_pool2d on the [N, D, grid, grid] view."""

import pytest
import torch
import torch.nn.functional as F

from fastnest.ops.pooling.naive import multiscale_pool
from fastnest.ops.projector.function import matryoshka_project
from fastnest.ops.projector.naive import reference_pool
from fastnest.scales import MatryoshkaScales

TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def features(n, grid, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, grid * grid, d, generator=g, dtype=torch.float64).to(dtype)


CASES = [
    (24, (1, 9, 36, 144, 576)),
    (24, (576, 1, 144, 9, 36)),  # arbitrary order
    (24, (16, 4, 64)),
    (27, (729, 81, 9, 1)),
    (27, (9, 729, 1, 81)),
    (4, (4, 1, 16)),
]


@pytest.mark.parametrize("grid, scales", CASES)
@pytest.mark.parametrize("n, d", [(1, 7), (2, 16), (3, 7)])
def test_fp32_matches_avg_pool2d(grid, scales, n, d):
    x = features(n, grid, d, seed=n * 100 + d)
    out = multiscale_pool(x, MatryoshkaScales(grid, scales))
    ref = reference_pool(x.double(), grid, scales)
    assert out.dtype == torch.float32
    assert out.shape == (n, sum(scales), d)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


def test_known_values_tiny_grid():
    # 2x2 grid, D=1: tokens 1, 2, 3, 4 -> the single pooled token is their mean 2.5
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    out = multiscale_pool(x, MatryoshkaScales(2, (1, 4)))
    torch.testing.assert_close(out, torch.tensor([[[2.5], [1.0], [2.0], [3.0], [4.0]]]))


def test_row_major_layout():
    # token value = its (row, col) encoded; a 4x4 grid pooled to 2x2 must give the quadrant means row-major
    grid = 4
    vals = torch.arange(grid * grid, dtype=torch.float64).reshape(1, grid * grid, 1)
    out = multiscale_pool(vals, MatryoshkaScales(grid, (4,)))
    m = vals.reshape(grid, grid)
    expected = [m[r : r + 2, c : c + 2].mean() for r in (0, 2) for c in (0, 2)]
    torch.testing.assert_close(out.reshape(-1), torch.stack(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid, scales", [CASES[1], CASES[3]])
def test_half_precision(dtype, grid, scales):
    x = features(3, grid, 7, dtype=dtype, seed=5)
    out = multiscale_pool(x, MatryoshkaScales(grid, scales))
    assert out.dtype == dtype
    ref = reference_pool(x.double(), grid, scales)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    # the means are taken in at least fp32, so they round like the exact mean does (within one ulp)
    torch.testing.assert_close(out, ref.to(dtype), rtol=TOL[dtype]["rtol"] / 2, atol=TOL[dtype]["atol"] / 2)


def test_float64_is_kept():
    x = features(2, 24, 5, dtype=torch.float64)
    out = multiscale_pool(x, MatryoshkaScales(24, (9, 1, 576)))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_pool(x, 24, (9, 1, 576)), **TOL[torch.float64])


def test_non_contiguous_input():
    base = features(2, 24, 7).transpose(1, 2).contiguous()  # [N, D, T]
    x = base.transpose(1, 2)  # [N, T, D] view, not contiguous
    assert not x.is_contiguous()
    out = multiscale_pool(x, MatryoshkaScales(24, (36, 1)))
    torch.testing.assert_close(out.double(), reference_pool(x.double(), 24, (36, 1)), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid, scales", [CASES[1], CASES[4]])
def test_gradient_matches_reference(dtype, grid, scales):
    n, d = 2, 7
    x = features(n, grid, d, dtype=dtype, seed=11).requires_grad_(True)
    g = torch.Generator().manual_seed(12)
    w = torch.randn(n, sum(scales), d, generator=g, dtype=torch.float64)
    (multiscale_pool(x, MatryoshkaScales(grid, scales)).double() * w).sum().backward()

    x_ref = x.detach().double().requires_grad_(True)
    (reference_pool(x_ref, grid, scales) * w).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("shape", [(576, 7), (2, 575, 7), (2, 577, 7), (2, 24, 24, 7), (2, 729, 7)])
def test_wrong_shape(shape):
    with pytest.raises(ValueError) as err:
        multiscale_pool(torch.zeros(shape), MatryoshkaScales(24, (1, 9)))
    assert str(tuple(shape)) in str(err.value)


class Mlp(torch.nn.Module):
    """A nonlinear projector, so pooling before vs after the projector gives different results."""

    def __init__(self, d_in, d_out, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(d_in, 2 * d_out, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(2 * d_out, d_out, dtype=torch.float64)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("grid, scales", [(24, (1, 9, 36, 144, 576)), (27, (81, 1)), (6, (9, 1, 36, 4))])
@pytest.mark.parametrize("as_spec", [False, True])
def test_project_then_pool(grid, scales, as_spec):
    proj = Mlp(5, 6)
    x = features(2, grid, 5, dtype=torch.float64, seed=3)
    arg = MatryoshkaScales(grid, scales) if as_spec else scales
    with torch.no_grad():
        out = matryoshka_project(x, proj, arg)
        assert proj.calls == 1
        ref = reference_pool(proj(x), grid, scales)
        pooled_first = reference_pool(x, grid, scales)
    assert out.shape == (2, sum(scales), 6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if scales != (576,):  # sanity: pooling before the nonlinear projector is a different function
        assert not torch.allclose(out, proj(pooled_first))


def test_project_gradient():
    proj = Mlp(5, 6, seed=1)
    x = features(1, 6, 5, dtype=torch.float64, seed=4).requires_grad_(True)
    w = torch.randn(1, 50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (matryoshka_project(x, proj, (1, 9, 4, 36)) * w).sum().backward()
    got = [x.grad] + [p.grad.clone() for p in proj.parameters()]
    x.grad = None
    proj.zero_grad()
    (reference_pool(proj(x), 6, (1, 9, 4, 36)) * w).sum().backward()
    want = [x.grad] + [p.grad for p in proj.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens", [10, 575, 24, 2])
def test_project_non_square(tokens):
    with pytest.raises(ValueError) as err:
        matryoshka_project(torch.zeros(1, tokens, 5), torch.nn.Identity(), (1,))
    assert str((1, tokens, 5)) in str(err.value)


def test_project_wrong_rank():
    with pytest.raises(ValueError) as err:
        matryoshka_project(torch.zeros(576, 5), torch.nn.Identity(), (1,))
    assert str((576, 5)) in str(err.value)


def test_project_grid_mismatch():
    with pytest.raises(ValueError) as err:
        matryoshka_project(torch.zeros(1, 27 * 27, 5), torch.nn.Identity(), MatryoshkaScales(24, (1, 9)))
    msg = str(err.value)
    assert "24x24" in msg and "27x27" in msg


def test_project_scales_invalid_for_features_grid():
    # a plain tuple is validated against the grid the features hold
    with pytest.raises(ValueError) as err:
        matryoshka_project(torch.zeros(1, 27 * 27, 5), torch.nn.Identity(), (1, 36))
    assert "36" in str(err.value)
