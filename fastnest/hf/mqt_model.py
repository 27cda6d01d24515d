"""MQT-LLaVA as a Hugging Face model: LLaVA with a Matryoshka Query Transformer in place of the projector.

``model_type = "mqt_llava"`` (registered with the Auto classes when ``fastnest.hf`` is imported):
``MQTLlavaConfig`` is a ``LlavaConfig`` plus the connector's options, which the release hard-wires in its
builder (``num_queries`` = 256, ``query_heads`` = 16, ``query_keys`` = "positional"; the key grid is the
tower's patch grid). The connector sits at ``model.query_abstractor`` (the release's name), so a released
checkpoint's ``model.query_abstractor.*`` keys need no renaming. ``get_image_features`` returns each image's
M query outputs: the caller's inputs hold M placeholder tokens per image (``image_seq_length`` = M).
"""

import dataclasses
import math
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, LlavaConfig, initialization
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)

from ..connectors.query import MatryoshkaQueryTransformer, sincos_2d


def _check(config) -> None:
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token, "
            "which has no place on the key grid; mqt_llava needs 'default'"
        )
    if config.query_keys not in ("positional", "features"):
        raise ValueError(f"query_keys must be 'positional' or 'features', got {config.query_keys!r}")
    config.image_seq_length = config.num_queries  # an image is M placeholder tokens


if dataclasses.is_dataclass(LlavaConfig):  # transformers >= 5.2x: configs are strict dataclasses

    @strict
    class MQTLlavaConfig(LlavaConfig):
        """``LlavaConfig`` plus the query transformer: ``num_queries`` (M, a perfect square), ``query_heads``
        (dividing the tower's width), ``query_keys`` ("positional": the release; "features": the paper)."""

        model_type = "mqt_llava"

        num_queries: int = 256
        query_heads: int = 16
        query_keys: Literal["positional", "features"] = "positional"

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            _check(self)

else:  # transformers 5.0: configs take their options in __init__

    class MQTLlavaConfig(LlavaConfig):
        """``LlavaConfig`` plus the query transformer: ``num_queries`` (M, a perfect square), ``query_heads``
        (dividing the tower's width), ``query_keys`` ("positional": the release; "features": the paper)."""

        model_type = "mqt_llava"

        def __init__(self, num_queries: int = 256, query_heads: int = 16, query_keys: str = "positional", **kwargs):
            self.num_queries, self.query_heads, self.query_keys = num_queries, query_heads, query_keys
            super().__init__(**kwargs)
            _check(self)


def feature_layers(config: MQTLlavaConfig, layer: int | list[int] | None = None) -> list[int]:
    layer = config.vision_feature_layer if layer is None else layer
    return [layer] if isinstance(layer, int) else list(layer)


def build_connector(config: MQTLlavaConfig) -> MatryoshkaQueryTransformer:
    vision = config.vision_config
    return MatryoshkaQueryTransformer(
        vision.hidden_size * len(feature_layers(config)),
        config.text_config.hidden_size,
        num_queries=config.num_queries,
        num_heads=config.query_heads,
        grid=vision.image_size // vision.patch_size,
        keys=config.query_keys,
    )


class MQTLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = MQTLlavaConfig
    config: MQTLlavaConfig

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, MatryoshkaQueryTransformer):  # the release's initialisation, loaded params kept
            initialization.trunc_normal_(module.query, std=0.02)
            table = sincos_2d(module.vision_dim, math.isqrt(module.num_queries))
            initialization.copy_(module.pos_embed, table.to(module.pos_embed.device, module.pos_embed.dtype))
            initialization.normal_(module.proj, 0.0, module.vision_dim**-0.5)
        else:
            super()._init_weights(module)


class MQTLlavaModel(MQTLlavaPreTrainedModel, LlavaModel):
    """``vision_tower``, ``query_abstractor`` (a :class:`MatryoshkaQueryTransformer`), ``language_model``."""

    def __init__(self, config: MQTLlavaConfig) -> None:
        MQTLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.query_abstractor = build_connector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def vision_features(
        self, pixel_values: torch.Tensor, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """The tower's outputs and ``[N, grid², Dv]``: the chosen layer(s) without CLS."""
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: mqt_llava needs 'default' (no CLS)")
        kwargs.pop("return_dict", None)
        kwargs["output_hidden_states"] = True
        out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), return_dict=True, **kwargs)
        layers = feature_layers(self.config, vision_feature_layer)
        return out, torch.cat([out.hidden_states[i][:, 1:] for i in layers], dim=-1)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Each image's M query outputs (``pooler_output``: a list of ``[M, D]``)."""
        if image_sizes is not None:
            raise ValueError("image_sizes is not supported: mqt_llava reads one fixed-size grid per image")
        out, feats = self.vision_features(pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs)
        out.pooler_output = list(self.query_abstractor(feats))
        return out


class MQTLlavaForConditionalGeneration(MQTLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA with a Matryoshka Query Transformer connector; Hugging Face's forward and generate, each image
    shown as its M query outputs (``fastnest.patch`` adds training over token counts and ``scale=m``)."""

    def __init__(self, config: MQTLlavaConfig) -> None:
        MQTLlavaPreTrainedModel.__init__(self, config)
        self.model = MQTLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def register() -> None:
    """Make ``mqt_llava`` known to AutoConfig, AutoModel and AutoModelForImageTextToText (idempotent)."""
    AutoConfig.register("mqt_llava", MQTLlavaConfig, exist_ok=True)
    AutoModel.register(MQTLlavaConfig, MQTLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MQTLlavaConfig, MQTLlavaForConditionalGeneration, exist_ok=True)


register()
