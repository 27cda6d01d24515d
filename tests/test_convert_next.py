"""``convert_original`` on a tiny M3 LLaVA-NeXT (anyres, spatial_unpad) checkpoint in the original format: it
loads into ``LlavaNextForConditionalGeneration`` with no missing or unexpected keys (``image_newline``
included), the pinpoints are swapped to Hugging Face's (height, width), and its logits at full scale equal the
original forward (base crop, then the grid crops stitched, unpadded, a newline per row; the -200 splice).

The release's ``unpad_image`` truncates the kept extent (``int``), Hugging Face's rounds it; the image sizes
here are ones where both keep the same rows and columns (checked below), so the comparison is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaNextForConditionalGeneration

import fastnest
from fastnest.hf.convert import convert_original
from tools.original_llava import (
    OriginalLlava,
    original_config,
    original_ids,
    original_logits,
    select_best_resolution,
    tiny_configs,
    word_tokenizer,
    write_clip,
    write_original,
)

V = len(word_tokenizer())
CROP = 24  # the tower's image size: 6x6 patches of 4 pixels
PINPOINTS = [[48, 24], [24, 48]]  # the release's (width, height)
# (width, height): 2 crops across x 1 down, 1 x 2, and a square image, where the two pinpoints tie and the
# first wins: 2 x 1 in the release's order, 1 x 2 if the list were read unswapped as (height, width)
SIZES = [(100, 35), (35, 100), (60, 60)]
SCALES = [36, 9, 1]


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    torch.manual_seed(0)
    text, vision = tiny_configs(vocab=V, image_size=CROP)
    model = OriginalLlava(text, vision, "llava_next").eval()
    clip = write_clip(model.model.vision_tower.vision_tower, root / "clip")
    config = original_config(
        model,
        str(clip),
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=str(PINPOINTS),  # some released configs hold the list as a string
        matryoshka_vis_token_scale=SCALES,
    )
    write_original(model, root / "original", config, shards=2)
    convert_original(root / "original", root / "hf")
    return model, root


def full_scale_tokens(size, across, down, side=6):
    """The stitched full-scale map's tokens after unpadding and newlines, the release's (its kept extent
    truncated) and HF's (rounded); and whether unpadding removed anything."""
    width, height = size
    rows, cols = down * side, across * side
    if width / height > cols / rows:  # rows are cut
        exact = height * cols / width
        kept = [rows - 2 * ((rows - int(e)) // 2) for e in (exact, round(exact, 7))]
        return [k * (cols + 1) for k in kept], kept[0] < rows
    exact = width * rows / height  # columns are cut
    kept = [cols - 2 * ((cols - int(e)) // 2) for e in (exact, round(exact, 7))]
    return [rows * (k + 1) for k in kept], kept[0] < cols


def test_loads_with_newline_and_swapped_pinpoints(next_checkpoint):
    model, root = next_checkpoint
    loaded, info = LlavaNextForConditionalGeneration.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    swapped = [[h, w] for w, h in PINPOINTS]
    assert loaded.config.image_grid_pinpoints == swapped
    assert AutoProcessor.from_pretrained(root / "hf").image_processor.image_grid_pinpoints == swapped
    assert torch.equal(loaded.model.image_newline, model.model.image_newline)
    assert loaded.config.fastnest == {"scales": SCALES}


@pytest.mark.parametrize("size", SIZES)
def test_full_scale_logits_equal_the_original_forward(next_checkpoint, size):
    model, root = next_checkpoint
    across, down = (d // CROP for d in select_best_resolution(size, PINPOINTS))
    assert (across, down) == ((2, 1) if size[0] >= size[1] else (1, 2))
    (release, hf), cut = full_scale_tokens(size, across, down)
    assert release == hf and cut  # something is unpadded, the same way in both
    converted = LlavaNextForConditionalGeneration.from_pretrained(root / "hf").eval()
    processor = AutoProcessor.from_pretrained(root / "hf")
    rng = np.random.default_rng(sum(size))
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    before, after = "user describe the picture", "assistant a blue square on the left"
    inputs = processor(text=f"{before} <image> {after}", images=picture, return_tensors="pt")
    with torch.no_grad():
        got = converted(**inputs).logits
    ids = original_ids(AutoTokenizer.from_pretrained(root / "original"), before, after)
    crops = inputs["pixel_values"][0, : 1 + across * down]
    want = original_logits(model, ids, crops, image_size=size, pinpoints=PINPOINTS)
    assert want.shape[1] == got.shape[1] == ids.shape[1] - 1 + 36 + release
    torch.testing.assert_close(got[..., :V], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_patched_conversion_restores_the_scales_and_equals_the_original_at_each(next_checkpoint, size):
    """``fastnest.patch`` on the converted model reads the stored scales; with the release's unpadding its logits
    at every scale equal the original forward with each crop pooled to that scale."""
    model, root = next_checkpoint
    converted = fastnest.patch(LlavaNextForConditionalGeneration.from_pretrained(root / "hf"), unpad="released")
    assert fastnest.patch_state(converted).spec.scales == tuple(SCALES)
    converted.eval()
    processor = AutoProcessor.from_pretrained(root / "hf")
    across, down = (d // CROP for d in select_best_resolution(size, PINPOINTS))
    rng = np.random.default_rng(sum(size) + 1)
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    before, after = "user describe the picture", "assistant a blue square"
    inputs = processor(text=f"{before} <image> {after}", images=picture, return_tensors="pt")
    ids = original_ids(AutoTokenizer.from_pretrained(root / "original"), before, after)
    crops = inputs["pixel_values"][0, : 1 + across * down]
    for scale in SCALES:
        with torch.no_grad():
            got = converted(**inputs, scale=scale).logits
        want = original_logits(model, ids, crops, scale=scale, image_size=size, pinpoints=PINPOINTS)
        assert got.shape[1] == want.shape[1], scale
        torch.testing.assert_close(got[..., :V], want, rtol=1e-5, atol=1e-5, msg=f"scale {scale}")
