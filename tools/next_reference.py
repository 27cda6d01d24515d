"""A plain, readable re-statement of the released M3 LLaVA-NeXT (anyres) arrangement and an M3 loop over it.

From mu-cai/matryoshka-mm ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``, its anyres
branch, ``matryoshka_vis_token_process``, ``unpad_image``) and LLaVA's ``llava/mm_utils.py``
(``select_best_resolution``, ``get_anyres_image_grid_shape``). Written against the UNPATCHED Hugging Face
model and without any fastnest code, so tests can compare fastnest to it. The released code takes image sizes
and grid pinpoints as (width, height); Hugging Face gives both as (height, width): the functions here take the
release's order and the callers swap. Only inference was released; the training loss is the released M3
objective (tools/m3_reference.py) over this arrangement: per scale, the vision tower and projector again, each
crop average-pooled on its own, stitched, unpadded, newlines, spliced, the full LM, full fp32 logits, the
token-mean next-token cross-entropy; the loss is the plain mean over scales.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tools.m3_reference import padded_lm_loss


def select_best_resolution(original_size, possible_resolutions):
    """mm_utils: the pinpoint (width, height) that keeps most of the image, then wastes least; first on a tie."""
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def anyres_grid_shape(image_size, grid_pinpoints, crop: int) -> tuple[int, int]:
    """mm_utils: (crops across, crops down) for an image of ``image_size`` (width, height)."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return width // crop, height // crop


def unpad_image(tensor: torch.Tensor, original_size, rounding: str = "released") -> torch.Tensor:
    """llava_arch: cut the padding off a ``[C, H, W]`` map of an image of ``original_size`` (width, height).
    ``rounding``: "released" (``int(x)``) or "hf" (Hugging Face's ``int(round(x, 7))``)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]

    def extent(x):
        return int(x) if rounding == "released" else int(round(x, 7))

    if original_width / original_height > current_width / current_height:
        scale_factor = current_width / original_width
        new_height = extent(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = extent(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def released_pinpoints(model) -> list[tuple[int, int]]:
    """The model's (Hugging Face: height, width) pinpoints in the release's (width, height) order."""
    return [(w, h) for h, w in model.config.image_grid_pinpoints]


def arrange(pooled: torch.Tensor, newline: torch.Tensor, image_size, grid_pinpoints, crop: int, rounding: str):
    """llava_arch's anyres branch on one image's pooled crops ``[crops, s, D]`` (base first): base tokens, then
    the grid crops stitched, unpadded, a newline after each row. ``image_size``/pinpoints: (width, height)."""
    base, grid = pooled[0], pooled[1:]
    height = width = int(math.sqrt(base.shape[0]))
    across, down = anyres_grid_shape(image_size, grid_pinpoints, crop)
    grid = grid.view(down, across, height, width, -1)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, image_size, rounding)
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


def crop_features(model, crops: torch.Tensor) -> torch.Tensor:
    """Vision tower (the configured layer, CLS dropped) and projector on ``[n, 3, H, W]`` crops: ``[n, grid², D]``."""
    out = model.model.vision_tower(crops, output_hidden_states=True)
    return model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])


def pool(features: torch.Tensor, scale: int) -> torch.Tensor:
    """matryoshka_vis_token_process: each ``[grid², D]`` map average-pooled to ``scale`` tokens, row-major."""
    n, tokens, d = features.shape
    grid = int(math.sqrt(tokens))
    kernel = int(math.sqrt(tokens / scale))
    as_grid = features.view(n, grid, grid, d).permute(0, 3, 1, 2)
    return F.avg_pool2d(as_grid, kernel_size=kernel, stride=kernel).permute(0, 2, 3, 1).reshape(n, -1, d)


def image_crops(model, pixel_values, image_sizes) -> list[torch.Tensor]:
    """Each image's crops, the processor's padding crops dropped: base + across·down."""
    crop = model.config.vision_config.image_size
    out = []
    for pixels, (h, w) in zip(pixel_values, image_sizes.tolist()):
        across, down = anyres_grid_shape((w, h), released_pinpoints(model), crop)
        out.append(pixels[: 1 + across * down])
    return out


def placeholder_count(model, image_size_hw) -> int:
    """The processor's full-scale placeholder count (Hugging Face rounding): the arrangement's length at grid²."""
    crop = model.config.vision_config.image_size
    grid = crop // model.config.vision_config.patch_size
    h, w = image_size_hw
    across, down = anyres_grid_shape((w, h), released_pinpoints(model), crop)
    kept = unpad_image(torch.zeros(1, down * grid, across * grid), (w, h), "hf")
    return grid * grid + kept.shape[1] * (kept.shape[2] + 1)


def image_tokens(model, pixel_values, image_sizes, scale: int, rounding: str = "hf") -> list[torch.Tensor]:
    """Every image's tokens at ``scale``: ``[s + R·(C + 1), D]`` each."""
    crop = model.config.vision_config.image_size
    out = []
    for crops, (h, w) in zip(image_crops(model, pixel_values, image_sizes), image_sizes.tolist()):
        pooled = pool(crop_features(model, crops), scale)
        out.append(arrange(pooled, model.model.image_newline, (w, h), released_pinpoints(model), crop, rounding))
    return out


def scaled_rows(model, input_ids, attention_mask, pixel_values, image_sizes, labels, scale, rounding="hf"):
    """Each row's valid tokens as embeddings, each image's placeholder run replaced by its tokens at ``scale``:
    lists of ``[len, D]`` embeddings and ``[len]`` labels."""
    image_id = model.config.image_token_id
    tokens = image_tokens(model, pixel_values, image_sizes, scale, rounding) if pixel_values is not None else []
    runs = [placeholder_count(model, size) for size in image_sizes.tolist()] if pixel_values is not None else []
    embed = model.get_input_embeddings()
    rows_embeds, rows_labels, image = [], [], 0
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, lab = input_ids[b][keep], labels[b][keep] if labels is not None else None
        embeds, out_labels, t = [], [], 0
        while t < len(ids):
            if ids[t] == image_id:
                embeds.append(tokens[image])
                out_labels += [-100] * len(tokens[image])
                t += runs[image]
                image += 1
            else:
                embeds.append(embed(ids[t : t + 1]))
                out_labels.append(int(lab[t]) if lab is not None else -100)
                t += 1
        rows_embeds.append(torch.cat(embeds))
        rows_labels.append(torch.tensor(out_labels))
    return rows_embeds, rows_labels


def released_next_loss(
    model, input_ids, attention_mask, pixel_values, image_sizes, labels, scales, rounding: str = "hf"
):
    """The M3 objective over the anyres arrangement: ``(mean over scales, per-scale losses)``."""
    losses = []
    for scale in scales:
        embeds, labs = scaled_rows(model, input_ids, attention_mask, pixel_values, image_sizes, labels, scale, rounding)
        losses.append(padded_lm_loss(model, embeds, labs))
    per_scale = torch.stack(losses)
    return per_scale.mean(), per_scale
