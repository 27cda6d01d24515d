"""Projector + multi-scale pooling on CPU: the native path vs. unfused PyTorch, fp32, 24x24 grid, all five scales.

Run: ``nice python -m pytest bench/test_projector_cpu.py --benchmark-only -s``. Each test alternates the
variants round by round in one process (the machine's drift cancels in the ratios); the medians are printed per
test and as a table at the end of the run:

- ``torch``: ``nn.Sequential(Linear, GELU, Linear)``, then ``F.avg_pool2d`` per scale on the [N, D, 24, 24] view
  and ``torch.cat`` (autograd for the backward);
- ``native``: fastnest's native CPU functions (fastnest/ops/projector/native.py);
- ``gemm_only``: just the GEMMs either variant must run (2 forward, 4 more backward), a floor for both.

Shapes: LLaVA-1.5-7B's projector (1024 -> 4096 -> 4096, 2 images) and a small one (256 -> 1024 -> 1024, 8 images).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.conftest import SUMMARIES
from fastnest.dispatch import native_available, native_error
from fastnest.ops.projector.function import matryoshka_project
from fastnest.scales import DEFAULT_SCALES

GRID = 24
SHAPES = {  # name: (vision dim K, hidden H, output D, images N, timed rounds)
    "llava7b": (1024, 4096, 4096, 2, 3),
    "small": (256, 1024, 1024, 8, 5),
}
TARGET = 1.2  # native must be at least this many times faster than torch

pytestmark = pytest.mark.skipif(not native_available(), reason=str(native_error()))
_ROWS: list[str] = []


def _summary() -> list[str]:
    if not _ROWS:
        return []
    head = (
        f"  {'case':<28}{'torch s':>9}{'native s':>9}{'GEMMs s':>9}{'torch/native':>13}{'paired':>8}{'mins':>7}"
        "  target (paired)"
    )
    title = f"projector + pooling on CPU, fp32, {torch.get_num_threads()} threads (medians; mins = ratio of minima):"
    return ["", title, head, *_ROWS]


SUMMARIES.append(_summary)


def torch_project(x: torch.Tensor, projector: nn.Sequential, scales: tuple[int, ...]) -> torch.Tensor:
    """Unfused reference: the module, then avg_pool2d per scale on the [N, D, grid, grid] view, concatenated."""
    y = projector(x)
    n, _, d = y.shape
    image = y.transpose(1, 2).reshape(n, d, GRID, GRID)
    pooled = [F.avg_pool2d(image, GRID // round(s**0.5)).flatten(2).transpose(1, 2) for s in scales]
    return torch.cat(pooled, dim=1)


def native_project(x: torch.Tensor, projector: nn.Sequential, scales: tuple[int, ...]) -> torch.Tensor:
    return matryoshka_project(x, projector, scales, backend="native")


def gemm_only(x: torch.Tensor, projector: nn.Sequential, backward: bool) -> None:
    l1, _, l2 = projector
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        h = torch.mm(x2, l1.weight.t())
        y = torch.mm(h, l2.weight.t())
        if backward:
            grad_pre = torch.mm(y, l2.weight)
            torch.mm(y.t(), h), torch.mm(grad_pre, l1.weight), torch.mm(grad_pre.t(), x2)


def _setup(shape: str):
    k, hidden, d, n, _ = SHAPES[shape]
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, d))
    x = torch.randn(n, GRID * GRID, k, requires_grad=True)
    grad_out = torch.randn(n, sum(DEFAULT_SCALES), d)
    return projector, x, grad_out


def _run(project, projector, x, grad_out, backward: bool) -> torch.Tensor:
    if not backward:
        with torch.no_grad():
            return project(x, projector, DEFAULT_SCALES)
    x.grad = None
    projector.zero_grad(set_to_none=True)
    out = project(x, projector, DEFAULT_SCALES)
    out.backward(grad_out)
    return out


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_projector_cpu(benchmark, shape, backward):
    projector, x, grad_out = _setup(shape)
    # Same result first (fp32; the GEMMs dominate the rounding).
    ref = _run(torch_project, projector, x, grad_out, backward).detach()
    ref_grads = [p.grad.clone() for p in (x, *projector.parameters())] if backward else []
    out = _run(native_project, projector, x, grad_out, backward).detach()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for p, r in zip((x, *projector.parameters()), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-3, atol=1e-3)

    variants = {
        "torch": lambda: _run(torch_project, projector, x, grad_out, backward),
        "native": lambda: _run(native_project, projector, x, grad_out, backward),
        "gemm_only": lambda: gemm_only(x, projector, backward),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)

    def one_round() -> None:
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
        order.reverse()  # alternate who goes first

    rounds = SHAPES[shape][4]
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    for ts in times.values():
        del ts[: len(ts) - rounds]  # drop the warm-up round
    med = {name: statistics.median(ts) for name, ts in times.items()}
    paired = statistics.median(t / n for t, n in zip(times["torch"], times["native"]))
    mins = min(times["torch"]) / min(times["native"])  # least disturbed rounds, on a shared machine
    k, hidden, d, n, _ = SHAPES[shape]
    mode = "forward+backward" if backward else "forward"
    print(
        f"\n[{shape} {k}->{hidden}->{d}, N={n}, {mode}, fp32, {torch.get_num_threads()} threads, {rounds} rounds] "
        f"median s: torch {med['torch']:.3f}  native {med['native']:.3f}  gemm_only {med['gemm_only']:.3f} | "
        f"torch/native {med['torch'] / med['native']:.2f}x (paired median {paired:.2f}x; target >= {TARGET}x: "
        f"{'met' if paired >= TARGET else 'NOT met'}) | GEMMs are {med['gemm_only'] / med['native']:.0%} of native, "
        f"{med['gemm_only'] / med['torch']:.0%} of torch"
    )
    benchmark.extra_info.update(median_s=med, torch_over_native_paired=paired, torch_over_native_min=mins)
    _ROWS.append(
        f"  {shape + ' ' + mode:<28}{med['torch']:>9.3f}{med['native']:>9.3f}{med['gemm_only']:>9.3f}"
        f"{med['torch'] / med['native']:>12.2f}x{paired:>7.2f}x{mins:>6.2f}x  >= {TARGET}x "
        f"{'met' if paired >= TARGET else 'NOT met'}"
    )
