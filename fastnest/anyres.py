"""LLaVA-NeXT's anyres arrangement at every Matryoshka scale, as an :class:`fastnest.layout.ImageLayout`.

An anyres image is ``1 + rows·cols`` crops (the whole image resized, then a ``rows × cols`` grid of crops of
the image resized and padded to the best grid resolution). At scale ``s`` each crop's ``grid × grid`` map is
average-pooled on its own to ``side × side`` tokens (``side = √s``); the image's tokens are the base crop's
``s`` (no newline), then the grid crops stitched into one ``(rows·side) × (cols·side)`` map, unpadded to the
image's aspect ratio AT THAT POOLED RESOLUTION, read row by row with one newline token after each map row:
``s + R·(C + 1)`` tokens for an unpadded ``R × C`` map (the released M3 LLaVA-NeXT inference).

The image's rows (what the layout indexes) are its crops' pooled rows, crop after crop (each crop's
``matryoshka_project`` output: every scale's block in ``spec.scales`` order), then ONE newline row (the
learned ``image_newline``), which every map row's newline token points to.
"""

from __future__ import annotations

import functools
import math

import torch

from .layout import ImageLayout
from .scales import MatryoshkaScales

UNPAD_MODES = ("hf", "released")


def unpadded_window(height: int, width: int, image_size: tuple[int, int], unpad: str = "hf") -> tuple[slice, slice]:
    """The rows and columns of a ``height × width`` map of a padded image that show the image itself.

    ``image_size`` is the original ``(height, width)``. The image was resized to fit the map and padded
    evenly on the long sides; the padding is cut off, rounding the image's extent on the map as Hugging Face
    does (``unpad="hf"``: ``int(round(x, 7))``) or as the released LLaVA-NeXT code does (``"released"``:
    ``int(x)``, which for some sizes keeps a row or column less on each side).
    """
    if unpad not in UNPAD_MODES:
        raise ValueError(f"unpad must be one of {UNPAD_MODES}, got {unpad!r}")
    image_height, image_width = image_size

    def extent(x: float) -> int:
        return int(round(x, 7)) if unpad == "hf" else int(x)

    # the float operations in the order both implementations use: they decide the rounding
    if image_width / image_height > width / height:
        padding = (height - extent(image_height * (width / image_width))) // 2
        return slice(padding, height - padding), slice(0, width)
    padding = (width - extent(image_width * (height / image_height))) // 2
    return slice(0, height), slice(padding, width - padding)


def _checked_size(name: str, value: tuple[int, int]) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{name} must be two positive ints, got {value!r}")
    return tuple(value)


def _scale_tokens(spec: MatryoshkaScales, k: int, grid_shape: tuple[int, int], image_size, unpad: str) -> torch.Tensor:
    """Scale ``k``'s tokens as row indices: the base crop's block, then the unpadded stitched map with a
    newline row after each map row."""
    rows, cols = grid_shape
    side, offset = math.isqrt(spec.scales[k]), spec.offsets[k]
    base = offset + torch.arange(spec.scales[k])
    keep_r, keep_c = unpadded_window(rows * side, cols * side, image_size, unpad)
    r = torch.arange(rows * side)[keep_r, None]
    c = torch.arange(cols * side)[None, keep_c]
    crop = 1 + (r // side) * cols + c // side  # crop 0 is the base image; the grid crops row-major
    stitched = crop * spec.total + offset + (r % side) * side + c % side
    newline = torch.full((stitched.shape[0], 1), (1 + rows * cols) * spec.total)
    return torch.cat([base, torch.cat([stitched, newline], dim=1).flatten()])


@functools.lru_cache(maxsize=4096)
def anyres_layout(
    spec: MatryoshkaScales, grid_shape: tuple[int, int], image_size: tuple[int, int], unpad: str = "hf"
) -> ImageLayout:
    """One anyres image: a ``grid_shape = (rows, cols)`` grid of crops (plus the base crop) of an image of
    ``image_size = (height, width)`` pixels, at every scale of ``spec`` (``spec.grid``: each crop's token grid).

    ``placeholders`` is the image's count at the full grid with Hugging Face's rounding, which
    ``LlavaNextProcessor`` writes into ``input_ids``; ``tokens[k]`` is the arrangement at ``spec.scales[k]``
    with ``unpad``'s rounding (see :func:`unpadded_window`). ``rows`` = crops · ``spec.total`` + 1 (the newline).
    """
    grid_shape, image_size = _checked_size("grid_shape", grid_shape), _checked_size("image_size", image_size)
    rows, cols = grid_shape
    keep_r, keep_c = unpadded_window(rows * spec.grid, cols * spec.grid, image_size, "hf")
    kept_rows, kept_cols = len(range(rows * spec.grid)[keep_r]), len(range(cols * spec.grid)[keep_c])
    return ImageLayout(
        placeholders=spec.grid**2 + kept_rows * (kept_cols + 1),
        rows=(1 + rows * cols) * spec.total + 1,
        tokens=tuple(_scale_tokens(spec, k, grid_shape, image_size, unpad) for k in range(len(spec.scales))),
    )
