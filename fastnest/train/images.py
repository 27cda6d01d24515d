"""Decoded images as ``uint8 [H, W, 3]`` RGB arrays, handed to the image processor channels-last explicitly.

The processor guesses where the channels are when it is not told: a 3- or 4-pixel-tall (or 1-pixel) array
looks channels-first to it, and comes out scrambled. Every image therefore goes through ``rgb_array`` and the
processor is called with ``input_data_format="channels_last"``.
"""

from __future__ import annotations

import numpy as np
import torch

# Modes whose samples are 16-bit (or wider) integers: PIL's convert("RGB") clips them at 255 instead of scaling.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def rgb_array(image, where: str = "image") -> np.ndarray:
    """A PIL image of any mode, or an ``[H, W, 3]`` uint8 array, as a ``uint8 [H, W, 3]`` RGB array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"{where}: expected a uint8 [H, W, 3] array, got {image.dtype} {list(image.shape)}")
        return image
    if 0 in image.size:
        raise ValueError(f"{where}: the image is empty ({image.size[0]}x{image.size[1]} pixels)")
    if image.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.int64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)  # 0..65535 -> 0..255
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def pixel_values(image_processor, images: list) -> dict[str, torch.Tensor]:
    """The processor's ``pixel_values`` of ``images`` (``rgb_array`` inputs), channels stated; an anyres
    processor's ``image_sizes`` too."""
    arrays = [rgb_array(im) for im in images]
    out = image_processor(arrays, return_tensors="pt", input_data_format="channels_last")
    return {k: out[k] for k in ("pixel_values", "image_sizes") if k in out}
