"""Projector + multi-scale pooling: the seam where the fused kernels plug in."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .pooling import multiscale_pool
from .scales import MatryoshkaScales


def matryoshka_project(
    x: torch.Tensor, projector: Callable[[torch.Tensor], torch.Tensor], scales: tuple[int, ...] | MatryoshkaScales
) -> torch.Tensor:
    """Project vision features ``x [N, grid*grid, Dv]`` and pool the result to every scale.

    Returns ``[N, sum(scales), D]`` (each image's scales in the order given, row-major inside a scale).
    Pooling comes after the projector, as the released M3 checkpoints expect.
    """
    grid = math.isqrt(x.shape[1]) if x.dim() == 3 else 0
    if x.dim() != 3 or grid * grid != x.shape[1]:
        raise ValueError(f"expected features [N, grid*grid, D] on a square grid, got shape {tuple(x.shape)}")
    spec = scales if isinstance(scales, MatryoshkaScales) else MatryoshkaScales(grid, scales)
    if spec.grid != grid:
        raise ValueError(f"scales are for a {spec.grid}x{spec.grid} grid but features hold a {grid}x{grid} grid")
    return multiscale_pool(projector(x), spec)
