"""Token-count sets, validated by the connector that produces them.

A pooled square grid allows the counts whose kernel divides the grid (``MatryoshkaScales``); a query
transformer with ``M`` queries allows any count ``1..M`` (``QueryCounts``). Both keep their order (the order
of per-scale losses) and offer ``scales``, ``index``, ``only`` and ``tokens_per_image``: the patch code takes
either (``TokenCounts``). The plan and the layouts take any count a connector gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from .constants import DEFAULT_SCALES

__all__ = ["DEFAULT_SCALES", "MatryoshkaScales", "QueryCounts", "TokenCounts", "allowed_scales"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_counts(
    scales: Iterable[int], allowed: Container[int], empty: str, bad: Callable[[object], str], what: str
) -> tuple[int, ...]:
    """``scales`` as a tuple: not empty (else ``empty``), each an int in ``allowed`` (else ``bad(s)``), distinct."""
    scales = tuple(scales)
    if not scales:
        raise ValueError(empty)
    for s in scales:
        if not _is_int(s) or s not in allowed:
            raise ValueError(bad(s))
    if len(set(scales)) != len(scales):
        raise ValueError(f"{what} must be distinct, got {scales}")
    return scales


def allowed_scales(grid: int) -> tuple[int, ...]:
    """Token counts reachable by ``avg_pool2d`` with a kernel (= stride) that divides ``grid``."""
    return tuple(sorted((grid // k) ** 2 for k in range(1, grid + 1) if grid % k == 0))


@dataclass(frozen=True)
class MatryoshkaScales:
    """A validated set of scales for a ``grid x grid`` visual-token map.

    Scale ``s`` keeps ``s`` tokens: the grid is pooled with kernel = stride = ``grid / sqrt(s)``.
    The order of ``scales`` is kept: it is the order of pooled tokens and of per-scale losses.
    """

    grid: int
    scales: tuple[int, ...]

    def __init__(self, grid: int, scales: Iterable[int]) -> None:
        if not _is_int(grid) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        allowed = allowed_scales(grid)
        scales = _checked_counts(
            scales,
            allowed,
            f"scales must not be empty; allowed for a {grid}x{grid} grid: {allowed}",
            lambda s: (
                f"scale {s!r} does not pool a {grid}x{grid} grid evenly (kernel {grid}/sqrt({s!r}) is not "
                f"an integer); allowed scales: {allowed}"
            ),
            "scales",
        )
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "scales", scales)

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def kernels(self) -> tuple[int, ...]:
        """Pooling kernel (= stride) of each scale."""
        return tuple(self.grid // math.isqrt(s) for s in self.scales)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale's tokens in an image's concatenated ``[sum(scales)]`` token list."""
        out, acc = [], 0
        for s in self.scales:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def total(self) -> int:
        """Tokens per image over all scales."""
        return sum(self.scales)

    def index(self, scale: int) -> int:
        """Position of ``scale`` in ``scales``; ValueError naming the allowed set otherwise."""
        if not _is_int(scale) or scale not in self.scales:
            raise ValueError(f"scale {scale!r} is not configured; configured scales: {self.scales}")
        return self.scales.index(scale)

    def only(self, scale: int) -> MatryoshkaScales:
        """The single-scale set used at inference."""
        self.index(scale)
        return MatryoshkaScales(self.grid, (scale,))


@dataclass(frozen=True)
class QueryCounts:
    """A validated set of token counts for a query transformer with ``num_queries`` (M) queries: any distinct
    counts in ``1..M``, order kept. Count ``m`` keeps the first ``m`` query outputs; an image occupies ``M``
    placeholder tokens in the caller's ``input_ids``."""

    num_queries: int
    scales: tuple[int, ...]

    def __init__(self, num_queries: int, scales: Iterable[int]) -> None:
        if not _is_int(num_queries) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        scales = _checked_counts(
            scales,
            range(1, num_queries + 1),
            f"token counts must not be empty; allowed: any of 1..{num_queries}",
            lambda s: (
                f"token count {s!r} is not allowed by a query transformer with {num_queries} queries; "
                f"allowed: ints in 1..{num_queries}"
            ),
            "token counts",
        )
        object.__setattr__(self, "num_queries", num_queries)
        object.__setattr__(self, "scales", scales)

    @property
    def tokens_per_image(self) -> int:
        return self.num_queries

    def index(self, scale: int) -> int:
        """Position of ``scale`` in ``scales``; ValueError naming the configured counts otherwise."""
        if not _is_int(scale) or scale not in self.scales:
            shown = f"1..{self.num_queries}" if self.scales == tuple(range(1, self.num_queries + 1)) else self.scales
            raise ValueError(f"token count {scale!r} is not configured; configured counts: {shown}")
        return self.scales.index(scale)

    def only(self, scale: int) -> QueryCounts:
        """The single-count set used at inference."""
        self.index(scale)
        return QueryCounts(self.num_queries, (scale,))


TokenCounts = MatryoshkaScales | QueryCounts
