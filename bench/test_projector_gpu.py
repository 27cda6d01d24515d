"""Projector + multi-scale pooling on CUDA: fastnest's fused Triton kernels vs. unfused PyTorch.

Run: ``python -m pytest bench/test_projector_gpu.py --benchmark-only -s`` (skipped, not faked, without CUDA).
LLaVA-1.5-7B's projector (CLIP-L 1024 -> 4096 -> 4096, GELU), bf16, 24x24 grid pooled to 576/144/36/9/1 tokens,
N = 16, 32, 64 images; forward and forward+backward. ``unfused`` is ``nn.Sequential(Linear, GELU, Linear)`` then
``F.avg_pool2d`` per scale and ``torch.cat``; ``fused`` is ``fastnest.matryoshka_project(..., backend="triton")``.
The two alternate round by round (CUDA events), so clock drift cancels in the ratio. Printed per case: medians,
unfused/fused, the fused step's TFLOP/s and GB/s (compulsory traffic: inputs, weights, the saved activations and
the output) against the device's peak, and cuBLAS's TFLOP/s on the same GEMMs as a practical roofline.
Targets: fused >= 1.3x faster than unfused in forward+backward, >= 70% of the GEMM roofline (the device peak).
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.conftest import SUMMARIES
from fastnest import DEFAULT_SCALES, matryoshka_project

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA benchmark: no GPU on this machine")

K, H, D, GRID = 1024, 4096, 4096, 24  # LLaVA-1.5-7B: CLIP-L/336 features -> Vicuna-7B width
ROUNDS = 20
TARGET_SPEEDUP, TARGET_ROOFLINE = 1.3, 0.7
# dense bf16 tensor-core TFLOP/s and memory TB/s from the vendors' data sheets, by device-name substring
PEAKS = {"H200": (989, 4.8), "H100 PCIe": (756, 2.0), "H100": (989, 3.35), "A100": (312, 2.0), "L40S": (362, 0.86)}
_ROWS: list[str] = []


def _summary() -> list[str]:
    if not _ROWS:
        return []
    name = torch.cuda.get_device_name()
    head = f"  {'case':<22}{'fused ms':>9}{'unfused ms':>11}{'speedup':>9}{'TFLOP/s':>9}{'%peak':>7}{'GB/s':>7}"
    return ["", f"projector + pooling on {name}, bf16 (speedup = unfused / fused):", head + "  cuBLAS TFLOP/s", *_ROWS]


SUMMARIES.append(_summary)


def _peak() -> tuple[float, float] | None:
    name = torch.cuda.get_device_name()
    return next((p for key, p in PEAKS.items() if key in name), None)


def unfused(x: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    y = projector(x)
    n, _, d = y.shape
    image = y.transpose(1, 2).reshape(n, d, GRID, GRID)
    pooled = [F.avg_pool2d(image, GRID // round(s**0.5)).flatten(2).transpose(1, 2) for s in DEFAULT_SCALES]
    return torch.cat(pooled, dim=1)


def fused(x: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    return matryoshka_project(x, projector, DEFAULT_SCALES, backend="triton")


def _timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("n", [16, 32, 64])
def test_projector_cuda(benchmark, n: int, mode: str):
    torch.manual_seed(0)
    proj = nn.Sequential(nn.Linear(K, H), nn.GELU(), nn.Linear(H, D)).cuda().bfloat16()
    x = torch.randn(n, GRID * GRID, K, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "forward")
    grad = torch.randn(n, sum(DEFAULT_SCALES), D, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x, proj), unfused(x, proj), rtol=2e-2, atol=2e-2)

    def run(impl):
        def step() -> None:
            if mode == "forward":
                with torch.no_grad():
                    impl(x, proj)
            else:
                impl(x, proj).backward(grad)

        return step

    variants = {"fused": run(fused), "unfused": run(unfused)}
    times: dict[str, list[float]] = {name: [] for name in variants}

    def pair() -> None:
        for name, fn in variants.items():
            times[name].append(_timed(fn))

    for fn in variants.values():  # compile and warm up
        fn()
    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    t_fused, t_unfused = statistics.median(times["fused"]), statistics.median(times["unfused"])

    m = n * GRID * GRID
    flops = 2 * m * K * H + 2 * m * H * D
    traffic = 2 * (m * K + K * H + H * D + m * sum(DEFAULT_SCALES) // (GRID * GRID) * D)  # bf16 bytes
    if mode == "forward_backward":
        flops *= 3
        traffic += 2 * 3 * m * H  # pre-activation and GELU output saved, re-read, their gradient
    a, w1, w2 = torch.randn(m, K, device="cuda", dtype=torch.bfloat16), proj[0].weight, proj[2].weight
    h = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
    gemms = [lambda: a @ w1.t(), lambda: h @ w2.t()]
    t_cublas = sum(statistics.median(_timed(g) for _ in range(10)) for g in gemms) * (3 if mode != "forward" else 1)
    peak = _peak()
    tflops = flops / t_fused / 1e12
    pct = f"{tflops / peak[0]:>6.0%}" if peak else "   n/a"
    _ROWS.append(
        f"  {f'N={n} {mode}':<22}{t_fused * 1e3:>9.2f}{t_unfused * 1e3:>11.2f}{t_unfused / t_fused:>8.2f}x"
        f"{tflops:>9.0f}{pct}{traffic / t_fused / 1e9:>7.0f}  {flops / t_cublas / 1e12:.0f}"
    )
    benchmark.extra_info.update(fused_s=t_fused, unfused_s=t_unfused, tflops=tflops)
