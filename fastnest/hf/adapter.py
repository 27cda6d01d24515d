"""Model adapters: where a Hugging Face model family keeps its parts, and what fastnest needs to know of it.

One small subclass per family names its modules and lays out its images; everything built on them (the
trainer's parameter groups and freezing, FSDP's shard units, the distributed dummy row) lives here once. An
adapter holds no state: its methods take the model, so one instance serves every model of its family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layout import ImageLayout
from ..scales import TokenCounts

PARTS = ("vision", "projector", "lm")  # the parameter groups of every adapter


class ModelAdapter:
    """The module paths and image layout of one model family (subclasses fill in the methods that raise)."""

    model_type: str = ""
    scale_unit: str = "visual tokens"  # what a scale counts, per image (an anyres family: per crop)

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def connector(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder without its head: ``(inputs_embeds, position_ids, ...) -> last_hidden_state``."""
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def image_token_id(self, model: nn.Module) -> int:
        raise NotImplementedError

    def grid(self, model: nn.Module) -> int:
        """Side of the square token grid the connector pools."""
        raise NotImplementedError

    def image_layouts(
        self, model: nn.Module, spec: TokenCounts, pixel_values: torch.Tensor | None, image_sizes=None
    ) -> Sequence[ImageLayout]:
        """Each image's layout (``image_sizes``: the families whose layout depends on the image's size)."""
        raise NotImplementedError

    def num_images(self, pixel_values: torch.Tensor, image_sizes=None) -> int:
        """The images ``pixel_values`` hold."""
        return pixel_values.shape[0]

    def multimodal(self, model: nn.Module) -> nn.Module:
        """The module whose ``get_image_features`` the model's own forward calls (fastnest replaces it there)."""
        raise NotImplementedError

    def vision_outputs(
        self, model: nn.Module, pixel_values: torch.Tensor, *options, image_sizes=None, **tower_options
    ) -> tuple[object, torch.Tensor]:
        """The tower's outputs, and ``[inputs, grid², Dv]``: its features as the connector reads them (an input
        is an image, or one crop of it)."""
        raise NotImplementedError

    def vision_features(self, model: nn.Module, pixel_values: torch.Tensor, **options) -> torch.Tensor:
        """``[inputs, grid², Dv]``: the tower's features as the connector reads them."""
        raise NotImplementedError

    def connector_rows(
        self, model: nn.Module, features: torch.Tensor, spec: TokenCounts, backend: str | None
    ) -> torch.Tensor:
        """``[inputs, rows, D]``: the connector's rows of every input (image or crop), from its features."""
        raise NotImplementedError

    def visual_rows(
        self, model: nn.Module, features: torch.Tensor, spec: TokenCounts, backend: str | None, image_sizes=None
    ) -> torch.Tensor:
        """``[sum of the images' rows, D]``: every image's rows in image order (``image_layouts`` index them)."""
        rows = self.connector_rows(model, features, spec, backend)
        return rows.reshape(-1, rows.shape[-1])

    def scaled_features(
        self,
        model: nn.Module,
        features: torch.Tensor,
        scales: Sequence[int],
        spec: TokenCounts,
        backend: str | None,
        pixel_values: torch.Tensor,
        image_sizes=None,
    ) -> list[torch.Tensor]:
        """Image ``i``'s tokens at ``scales[i]`` (``[count, D]``), from the tower's ``features``: inference."""
        pooled: list[torch.Tensor | None] = [None] * len(scales)
        for s in dict.fromkeys(scales):
            pick = [i for i, si in enumerate(scales) if si == s]
            only = spec.only(s)
            rows = self.connector_rows(model, features[pick], only, backend)
            layouts = self.image_layouts(model, only, pixel_values[pick])
            for j, i in enumerate(pick):  # an image's features at s: its rows at its layout's tokens
                pooled[i] = rows[j][layouts[j].tokens[0].to(rows.device)]
        return pooled

    def feature_layers(self, model: nn.Module) -> list[int]:
        """The tower's hidden-state indices the connector reads."""
        raise NotImplementedError

    def dummy_row(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """One label-free row holding one blank image (a process with no image still runs every module)."""
        raise NotImplementedError

    # --- built on the paths above -------------------------------------------------------------------------

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters by part (``PARTS``); a head tied to the input embedding is counted once, under ``lm``."""
        groups = {
            "vision": list(self.vision_tower(model).parameters()),
            "projector": list(self.connector(model).parameters()),
            "lm": list(self.language_model(model).parameters()),
        }
        seen = {id(p) for ps in groups.values() for p in ps}
        groups["lm"] += [p for p in self.lm_head(model).parameters() if id(p) not in seen]
        return groups

    def freeze_unread_vision(self, model: nn.Module) -> None:
        """The tower's layers after the deepest feature layer, and its post-norm, never get a gradient (DDP
        would wait for them forever): freeze them."""
        encoder, post = _encoder(self.vision_tower(model)), _post_layernorm(self.vision_tower(model))
        layers = encoder.layers
        deepest = max(i % (len(layers) + 1) for i in self.feature_layers(model))
        for unread in [*layers[deepest:], post]:
            if unread is not None:
                unread.requires_grad_(False)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """FSDP2 units besides the root: every decoder layer and every vision encoder layer."""
        encoder = _encoder(self.vision_tower(model))
        units = list(self.language_model(model).layers)
        return units + (list(encoder.layers) if encoder is not None else [])


def _encoder(tower: nn.Module) -> nn.Module | None:
    """A CLIP-style tower's encoder (``tower.encoder`` or, in older layouts, ``tower.vision_model.encoder``)."""
    return getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)


def _post_layernorm(tower: nn.Module) -> nn.Module | None:
    return getattr(tower, "post_layernorm", None) or getattr(
        getattr(tower, "vision_model", None), "post_layernorm", None
    )
