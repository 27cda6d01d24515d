"""Shared pieces of the original-LLaVA cases: the tiny model pair and the batch rows."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("llava", reason="runs in the original LLaVA code's environment (tests/test_llava_original.py)")

import fastnest.integrations.llava_original as fastnest_llava  # noqa: E402
from tools.llava_original import IMG, original_batch, tiny_original_llava  # noqa: E402

GRID, PATCH, VOCAB = 24, 2, 300  # a 24x24 grid: the released scales 1, 9, 36, 144, 576
IMAGE_SIZE = GRID * PATCH
# an image row, a text-only row (it carries a blank image), two images in one row, a row that starts with its image
ROWS = [[5, IMG, 12], [10, 20], [4, IMG, 3, IMG, 8], [IMG, 6]]


def batch(rows=ROWS, seed: int = 0) -> dict:
    return original_batch(rows, vocab=VOCAB, image_size=IMAGE_SIZE, seed=seed)


def pair(tower_dir, patch_options: dict | None = None, **config):
    """The plain model (the reference) and a patched deep copy, in training mode."""
    ref = tiny_original_llava(tower_dir, grid=GRID, patch=PATCH, vocab=VOCAB, **config).train()
    return ref, fastnest_llava.patch(copy.deepcopy(ref), **(patch_options or {}))
