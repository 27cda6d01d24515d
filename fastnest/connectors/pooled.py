"""``MatryoshkaProjector``: an LMM's projector followed by multi-scale pooling, as one nn.Module."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.projector.function import matryoshka_project
from ..scales import DEFAULT_SCALES, MatryoshkaScales


class MatryoshkaProjector(nn.Module):
    """Drop-in replacement for an LMM's projector: ``[N, grid*grid, Dv] -> [N, sum(scales), D]``.

    Holds the original projector as ``projector`` (its parameters and state-dict keys move under that name).
    """

    def __init__(
        self, projector: nn.Module, grid: int, scales: tuple[int, ...] = DEFAULT_SCALES, backend: str | None = None
    ) -> None:
        super().__init__()
        self.projector = projector
        self.spec = MatryoshkaScales(grid, scales)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matryoshka_project(x, self.projector, self.spec, self.backend)

    def extra_repr(self) -> str:
        return f"grid={self.spec.grid}, scales={self.spec.scales}, backend={self.backend or 'auto'}"
