"""Per-image token layouts: how an image sits in ``input_ids`` and which rows form its tokens at each scale.

A connector turns each image into a block of *rows* (its pooled grids, its query outputs, extra learned rows
such as a newline). An :class:`ImageLayout` says how many placeholder tokens the image occupies in the
caller's ``input_ids`` and, for every configured scale, which of the image's rows the language model sees, in
order. The plan (``fastnest.plan``) needs nothing else, so images of different connectors, grids or crop counts
pack side by side in one batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .scales import MatryoshkaScales, QueryCounts


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """One image: ``placeholders`` tokens in ``input_ids``; ``rows`` rows in the visual source; ``tokens[k]``
    (int64 indices into those rows) are its tokens at scale index ``k``."""

    placeholders: int
    rows: int
    tokens: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if self.placeholders < 1:
            raise ValueError(f"an image occupies at least one placeholder token, got placeholders={self.placeholders}")
        if not self.tokens:
            raise ValueError("an image layout needs the tokens of at least one scale")
        for k, t in enumerate(self.tokens):
            if t.dim() != 1 or t.dtype != torch.long:
                raise ValueError(f"tokens[{k}] must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.rows):
                raise ValueError(f"tokens[{k}] index rows outside [0, {self.rows})")

    @property
    def num_scales(self) -> int:
        return len(self.tokens)

    def count(self, k: int) -> int:
        """Tokens of the image at scale index ``k``."""
        return int(self.tokens[k].numel())

    @functools.cached_property
    def nested(self) -> int | None:
        """The scale index whose tokens every scale's tokens begin (a query transformer's first m of M), or
        None: then the language model sees the image the same way at every scale up to each one's count."""
        longest = max(range(self.num_scales), key=self.count)
        top = self.tokens[longest]
        return longest if all(torch.equal(t, top[: t.numel()]) for t in self.tokens) else None


@functools.cache
def pooled_grid(spec: MatryoshkaScales, placeholders: int | None = None) -> ImageLayout:
    """A pooled square grid (LLaVA-1.5): rows are every scale's pooled tokens in ``spec.scales`` order
    (``matryoshka_project``'s output); scale ``k`` is its block, row-major. ``placeholders``: the tokens the
    image occupies in ``input_ids``: ``grid²`` by default (Hugging Face's processor expands each image), 1 for
    code that marks each image with a single token (the original LLaVA's ``IMAGE_TOKEN_INDEX``)."""
    tokens = tuple(torch.arange(off, off + s) for s, off in zip(spec.scales, spec.offsets))
    count = spec.tokens_per_image if placeholders is None else placeholders
    return ImageLayout(placeholders=count, rows=spec.total, tokens=tokens)


@functools.cache
def query_prefix(num_queries: int, counts: tuple[int, ...]) -> ImageLayout:
    """A query transformer's image: ``num_queries`` (M) placeholders and M rows (its query outputs, in query
    order); count ``k`` is the first ``counts[k]`` rows (the outputs are nested: the first m of M are the
    m-query outputs)."""
    spec = QueryCounts(num_queries, counts)  # ValueError naming the count outside 1..M
    return ImageLayout(placeholders=num_queries, rows=num_queries, tokens=tuple(torch.arange(m) for m in spec.scales))


def check_layouts(layouts: Sequence[ImageLayout]) -> int:
    """The number of scales all ``layouts`` share (0 for no image); ValueError when they differ."""
    counts = {layout.num_scales for layout in layouts}
    if len(counts) > 1:
        raise ValueError(f"every image must have the same number of scales, got {sorted(counts)}")
    return counts.pop() if counts else 0
