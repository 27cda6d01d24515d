"""``processor_at_scale``: a LlavaProcessor that writes each image as ``s`` placeholders instead of grid²."""

from __future__ import annotations

import copy
import math

from ..scales import MatryoshkaScales


def processor_at_scale(processor, scale: int):
    """A copy of ``processor`` (a ``LlavaProcessor``) whose prompts hold ``scale`` placeholders per image.

    LlavaProcessor counts ``(h // patch_size) * (w // patch_size)`` placeholders (plus its additional tokens,
    minus CLS under the 'default' strategy), so a patch size ``k = grid / sqrt(scale)`` times larger gives
    ``(grid / k)²``. A patched model takes such inputs as they are (``model(..., scale=scale)``)."""
    for name in ("patch_size", "image_processor"):
        if getattr(processor, name, None) is None:
            raise ValueError(
                f"processor_at_scale needs a LlavaProcessor with {name} set, got {type(processor).__name__}"
            )
    crop = processor.image_processor.crop_size
    height, width = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])  # dict or SizeDict
    if height != width or height % processor.patch_size:
        raise ValueError(f"processor_at_scale needs square crops of whole patches, got {height}x{width}")
    grid = height // processor.patch_size
    MatryoshkaScales(grid, (scale,))  # ValueError naming the scales this grid allows
    scaled = copy.deepcopy(processor)
    scaled.patch_size = processor.patch_size * (grid // math.isqrt(scale))
    return scaled
