"""Hugging Face models: one adapter per model family, the attention hook, patch/unpatch, and a registry from
``config.model_type`` to the family's patch function. Importing it registers the ``mqt_llava`` model type."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapter import ModelAdapter
from .convert import convert_original
from .inference import scaled_inputs
from .llava import LLAVA, LlavaAdapter, patch_llava, set_scale, unpatch
from .llava_next import LLAVA_NEXT, LlavaNextAdapter, patch_llava_next
from .mqt import MQT_LLAVA, MQTLlavaAdapter, patch_mqt_llava
from .mqt_model import MQTLlavaConfig, MQTLlavaForConditionalGeneration, MQTLlavaModel
from .output import MatryoshkaCausalLMOutput
from .processor import processor_at_scale, processor_for_queries
from .route import load_router, route_scales
from .state import PatchState, is_patched, patch_state

PATCHES: dict[str, Callable[..., torch.nn.Module]] = {
    "llava": patch_llava,
    "llava_next": patch_llava_next,
    "mqt_llava": patch_mqt_llava,
}


def patch(model: torch.nn.Module, **options) -> torch.nn.Module:
    """Patch ``model`` with the function registered for its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PATCHES:
        raise ValueError(f"no fastnest patch for model_type {model_type!r}; supported: {sorted(PATCHES)}")
    return PATCHES[model_type](model, **options)


__all__ = [
    "LLAVA",
    "PATCHES",
    "LlavaAdapter",
    "LLAVA_NEXT",
    "LlavaNextAdapter",
    "MQT_LLAVA",
    "MQTLlavaAdapter",
    "MQTLlavaConfig",
    "MQTLlavaForConditionalGeneration",
    "MQTLlavaModel",
    "MatryoshkaCausalLMOutput",
    "ModelAdapter",
    "PatchState",
    "convert_original",
    "is_patched",
    "load_router",
    "patch",
    "patch_llava",
    "patch_llava_next",
    "patch_mqt_llava",
    "patch_state",
    "processor_at_scale",
    "processor_for_queries",
    "route_scales",
    "scaled_inputs",
    "set_scale",
    "unpatch",
]
