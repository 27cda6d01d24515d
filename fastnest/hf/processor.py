"""``processor_at_scale``: a LlavaProcessor that writes each image as ``s`` placeholders instead of grid²."""

from __future__ import annotations

import copy
import math

from ..scales import MatryoshkaScales


def processor_at_scale(processor, scale: int):
    """A copy of ``processor`` (a ``LlavaProcessor``) whose prompts hold ``scale`` placeholders per image (a
    ``LlavaNextProcessor``: each image's anyres count at ``scale``, with Hugging Face's unpad rounding).

    LlavaProcessor counts ``(h // patch_size) * (w // patch_size)`` placeholders (plus its additional tokens,
    minus CLS under the 'default' strategy), so a patch size ``k = grid / sqrt(scale)`` times larger gives
    ``(grid / k)²``. A patched model takes such inputs as they are (``model(..., scale=scale)``)."""
    grid = _square_crop(processor, "processor_at_scale") // processor.patch_size
    MatryoshkaScales(grid, (scale,))  # ValueError naming the scales this grid allows
    scaled = copy.deepcopy(processor)
    scaled.patch_size = processor.patch_size * (grid // math.isqrt(scale))
    return scaled


def processor_for_queries(processor, num_queries: int):
    """A copy of ``processor`` (a ``LlavaProcessor``) whose prompts hold ``num_queries`` (M, a perfect square)
    placeholders per image: an MQT-LLaVA's input (its patched forward/generate cut them to ``scale=m``).

    The same count trick as ``processor_at_scale``: patch size = crop side / sqrt(M)."""
    crop = _square_crop(processor, "processor_for_queries")
    side = math.isqrt(num_queries) if isinstance(num_queries, int) and num_queries > 0 else 0
    if side * side != num_queries or crop % side:
        raise ValueError(
            f"processor_for_queries needs num_queries = s² with s dividing the crop side {crop}, got {num_queries!r}"
        )
    out = copy.deepcopy(processor)
    out.patch_size = crop // side
    return out


def _square_crop(processor, caller: str) -> int:
    """The side of the processor's square crop (a whole number of patches); ValueError otherwise."""
    for name in ("patch_size", "image_processor"):
        if getattr(processor, name, None) is None:
            raise ValueError(f"{caller} needs a LlavaProcessor with {name} set, got {type(processor).__name__}")
    crop = processor.image_processor.crop_size
    height, width = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])  # dict or SizeDict
    if height != width or height % processor.patch_size:
        raise ValueError(f"{caller} needs square crops of whole patches, got {height}x{width}")
    return height
