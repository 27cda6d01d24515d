"""Independent float64 references for the projector and the multi-scale pooling: F.linear, F.gelu, F.avg_pool2d.

The plain reference the projector kernels are tested against (tests/, bench/): no fastnest code involved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_pool(x: torch.Tensor, grid: int, scales: tuple[int, ...]) -> torch.Tensor:
    """avg_pool2d (kernel = stride = grid / sqrt(s)) on the row-major grid, per scale, concatenated."""
    n, tokens, d = x.shape
    assert tokens == grid * grid
    as_image = x.reshape(n, grid, grid, d).permute(0, 3, 1, 2)  # [N, D, g, g]
    out = []
    for s in scales:
        k = grid // math.isqrt(s)
        assert k * math.isqrt(s) == grid
        pooled = F.avg_pool2d(as_image, kernel_size=k, stride=k)  # [N, D, g/k, g/k]
        out.append(pooled.permute(0, 2, 3, 1).reshape(n, s, d))
    return torch.cat(out, dim=1)


def reference_project(x, w1, b1, w2, b2, approximate: str, grid: int, scales: tuple[int, ...]) -> torch.Tensor:
    """linear -> GELU -> linear, then pooling, all in float64 (the tensors may require grad)."""
    as64 = [t if t is None else t.double() for t in (x, w1, b1, w2, b2)]
    x, w1, b1, w2, b2 = as64
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return reference_pool(y, grid, scales)
