"""Multi-scale average pooling of a square visual-token grid, the plain reference (M3 pools AFTER the projector)."""

from __future__ import annotations

import torch

from ...scales import MatryoshkaScales


def multiscale_pool(x: torch.Tensor, spec: MatryoshkaScales) -> torch.Tensor:
    """Pool ``x [N, grid*grid, D]`` (row-major grid) to every scale.

    Returns ``[N, spec.total, D]``: each image's scales concatenated in ``spec.scales`` order, row-major inside
    a scale; equal to ``F.avg_pool2d(kernel=stride=k)`` on the grid. Means accumulate in fp32.
    """
    if x.dim() != 3 or x.shape[1] != spec.tokens_per_image:
        raise ValueError(
            f"expected features [N, {spec.tokens_per_image}, D] for a {spec.grid}x{spec.grid} grid, got {tuple(x.shape)}"
        )
    n, _, d = x.shape
    g = spec.grid
    grid = x.view(n, g, g, d)
    acc = grid.float() if x.dtype in (torch.float16, torch.bfloat16) else grid
    out = []
    for k in spec.kernels:
        if k == 1:
            out.append(x)
            continue
        pooled = acc.reshape(n, g // k, k, g // k, k, d).mean(dim=(2, 4))
        out.append(pooled.reshape(n, -1, d).to(x.dtype))
    return torch.cat(out, dim=1)
