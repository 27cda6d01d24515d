"""LLaVA-NeXT (Hugging Face ``LlavaNextForConditionalGeneration``, anyres): its adapter and ``patch_llava_next``.

Every crop of an image (the whole image resized, then its grid crops) goes through the vision tower and the
projector once; each crop's grid is pooled on its own to every scale (the fused projector kernels, crops as
the kernel's images); an image's tokens at a scale are the released M3 LLaVA-NeXT arrangement of those pooled
crops and the learned ``image_newline`` (``fastnest.anyres``). The grid of crops comes from the image's
``image_sizes`` entry and ``config.image_grid_pinpoints``, read at every call: a larger pinpoint set given at
inference (more crops than in training) needs no other change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextMultiModalProjector,
    get_anyres_image_grid_shape,
)

from ..anyres import UNPAD_MODES, anyres_layout
from ..constants import IGNORE_INDEX
from ..ops.projector.function import register_projector
from ..scales import MatryoshkaScales
from .llava import LlavaAdapter, install, pooled_state

register_projector(LlavaNextMultiModalProjector, lambda m: (m.linear_1, m.act, m.linear_2))


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA's module paths plus ``model.model.image_newline``; each image is ``1 + rows·cols`` crops laid out
    by :func:`fastnest.anyres.anyres_layout` with the ``unpad`` rounding ("hf" or "released")."""

    scale_unit = "visual tokens per crop"  # an image's tokens also depend on its grid of crops and the newlines

    model_type = "llava_next"

    def __init__(self, unpad: str = "hf") -> None:
        if unpad not in UNPAD_MODES:
            raise ValueError(
                f"unpad must be one of {UNPAD_MODES} ('hf': Hugging Face's rounding, as LlavaNextProcessor counts; "
                f"'released': the released M3 code's), got {unpad!r}"
            )
        self.unpad = unpad

    def __repr__(self) -> str:
        return f"LlavaNextAdapter(unpad={self.unpad!r})"

    def image_newline(self, model) -> torch.nn.Parameter:
        return model.model.image_newline

    def image_sizes(self, image_sizes, num_images: int | None = None) -> list[tuple[int, int]]:
        """``image_sizes`` (``[images, 2]``, each image's (height, width) as the processor gives them) as ints."""
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes with pixel_values: each image's (height, width), as LlavaNextProcessor "
                "returns them"
            )
        sizes = torch.as_tensor(image_sizes).tolist()
        if any(len(s) != 2 or min(s) < 1 for s in sizes) or (num_images is not None and len(sizes) != num_images):
            raise ValueError(
                f"image_sizes must hold one positive (height, width) per image ({num_images} images), got {sizes}"
            )
        return [(int(h), int(w)) for h, w in sizes]

    def grid_shape(self, model, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the image's grid crops, as Hugging Face chooses it from ``image_grid_pinpoints``."""
        config = model.config
        rows, cols = get_anyres_image_grid_shape(
            list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
        )
        return int(rows), int(cols)

    def crop_counts(self, model, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [1 + rows * cols for rows, cols in (self.grid_shape(model, size) for size in sizes)]

    def num_images(self, pixel_values, image_sizes=None) -> int:
        return len(self.image_sizes(image_sizes))

    def layouts_of(self, model, spec, sizes: Sequence[tuple[int, int]]):
        return [anyres_layout(spec, self.grid_shape(model, size), size, self.unpad) for size in sizes]

    def image_layouts(self, model, spec, pixel_values, image_sizes=None):
        if pixel_values is None:
            return []
        if pixel_values.dim() not in (4, 5):
            raise ValueError(
                f"pixel_values must be [images, crops, channels, height, width] (or the crops concatenated, "
                f"[crops, channels, height, width]), got shape {tuple(pixel_values.shape)}"
            )
        count = pixel_values.shape[0] if pixel_values.dim() == 5 else None
        return self.layouts_of(model, spec, self.image_sizes(image_sizes, count))

    def crops(self, model, pixel_values: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[all crops, channels, height, width]``: each image's crops in order, without the processor's
        padding crops (as Hugging Face takes them)."""
        counts = self.crop_counts(model, sizes)
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(counts):
                raise ValueError(
                    f"pixel_values hold {pixel_values.shape[0]} crops but the images' sizes and "
                    f"image_grid_pinpoints give {counts} crops (sum {sum(counts)})"
                )
            return pixel_values
        for i, (n, size) in enumerate(zip(counts, sizes)):
            if n > pixel_values.shape[1]:
                raise ValueError(
                    f"image {i} of size {size} needs {n} crops for its {self.grid_shape(model, size)} grid "
                    f"(image_grid_pinpoints {model.config.image_grid_pinpoints}) but pixel_values hold "
                    f"{pixel_values.shape[1]} per image; process the images with the same image_grid_pinpoints"
                )
        return torch.cat([p[:n] for p, n in zip(pixel_values, counts)])

    def vision_outputs(
        self,
        model,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        **tower_options,
    ):
        """The tower over every crop, and ``[all crops, grid², Dv]`` (each image's crops in order)."""
        count = pixel_values.shape[0] if pixel_values.dim() == 5 else None
        crops = self.crops(model, pixel_values, self.image_sizes(image_sizes, count))
        return super().vision_outputs(
            model, crops, vision_feature_layer, vision_feature_select_strategy, **tower_options
        )

    def visual_rows(self, model, features, spec, backend, image_sizes=None) -> torch.Tensor:
        """Each image's rows, image after image: its crops' pooled rows (each crop pooled on its own, the fused
        kernels when the projector is linear -> GELU -> linear), then the newline row."""
        rows = self.connector_rows(model, features, spec, backend)
        counts = self.crop_counts(model, self.image_sizes(image_sizes))
        newline = self.image_newline(model).to(rows.device, rows.dtype)[None]
        pieces = []
        for crops in rows.split(counts):
            pieces += [crops.flatten(0, 1), newline]
        return torch.cat(pieces)

    def scaled_features(self, model, features, scales, spec, backend, pixel_values, image_sizes=None):
        sizes = self.image_sizes(image_sizes, len(scales))
        counts = self.crop_counts(model, sizes)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        pooled: list[torch.Tensor | None] = [None] * len(scales)
        for s in dict.fromkeys(scales):
            pick = [i for i, si in enumerate(scales) if si == s]
            crops = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in pick]).to(features.device)
            only, picked = spec.only(s), [sizes[i] for i in pick]
            rows = self.visual_rows(model, features[crops], only, backend, picked)
            offset = 0
            for i, layout in zip(pick, self.layouts_of(model, only, picked)):
                pooled[i] = rows[offset + layout.tokens[0].to(rows.device)]
                offset += layout.rows
        return pooled

    def parameter_groups(self, model) -> dict[str, list[torch.nn.Parameter]]:
        """LLaVA's groups; ``image_newline`` (a visual row the LM reads) trains with the projector."""
        groups = super().parameter_groups(model)
        groups["projector"].append(self.image_newline(model))
        return groups

    def dummy_row(self, model) -> dict[str, torch.Tensor]:
        """One label-free row holding one blank crop-sized image (every module, the newline too, runs)."""
        size, grid = model.config.vision_config.image_size, self.grid(model)
        layout = self.layouts_of(model, MatryoshkaScales(grid, (grid * grid,)), [(size, size)])[0]
        crops = self.crop_counts(model, [(size, size)])[0]
        row = torch.tensor(
            [self.image_token_id(model)] * layout.placeholders + [model.config.text_config.pad_token_id or 0]
        )
        return {
            "input_ids": row[None],
            "attention_mask": torch.ones(1, len(row), dtype=torch.long),
            "labels": torch.full((1, len(row)), IGNORE_INDEX),
            "pixel_values": torch.zeros(1, crops, 3, size, size),
            "image_sizes": torch.tensor([[size, size]]),
        }


LLAVA_NEXT = LlavaNextAdapter("hf")
LLAVA_NEXT_RELEASED = LlavaNextAdapter("released")


def patch_llava_next(
    model: LlavaNextForConditionalGeneration,
    scales: tuple[int, ...] | None = None,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
    unpad: str = "hf",
    sampling: str = "all",
    seed: int = 0,
    lm_kernels: str = "auto",
) -> LlavaNextForConditionalGeneration:
    """Make a LLaVA-NeXT train on every Matryoshka scale in one packed forward, and infer at any scale.

    As :func:`fastnest.patch_llava` (the same ``scales`` — default: the ones stored in ``config.fastnest`` by
    ``fastnest convert``, else (1, 9, 36, 144, 576) —, ``attention``, ``share_prefix``, ``backend``,
    ``sampling``, ``seed``, ``lm_kernels``, training loss and ``scale=`` inference), for ``LlavaNextProcessor``
    inputs (each image's placeholder run at full scale, ``pixel_values [images, crops, 3, H, W]``,
    ``image_sizes``). At scale ``s`` an image is ``s + R·(C + 1)`` tokens: its base crop pooled to ``s``, then the grid crops each pooled to ``s``, stitched
    and unpadded to the image's aspect ratio at that pooled resolution, one ``image_newline`` per map row (the
    released M3 LLaVA-NeXT). ``unpad``: "hf" rounds the unpadded extent as Hugging Face does (the counts
    ``LlavaNextProcessor`` writes at full scale); "released" truncates as the released code does, which for
    some sizes keeps fewer rows or columns.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, LlavaNextForConditionalGeneration) or model_type != "llava_next":
        raise TypeError(
            f"patch_llava_next expects a LlavaNextForConditionalGeneration of model_type 'llava_next', got "
            f"{type(model).__name__} ({model_type!r}); fastnest.patch picks the patch for a model's type"
        )
    adapter = LLAVA_NEXT if unpad == "hf" else LLAVA_NEXT_RELEASED if unpad == "released" else LlavaNextAdapter(unpad)
    state = pooled_state(adapter, model, scales, attention, share_prefix, backend, sampling, seed, lm_kernels)
    return install(model, state)
