"""Hugging Face model patching: a registry from ``config.model_type`` to its patch function."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .llava import MatryoshkaCausalLMOutput, patch_llava, set_scale, unpatch

PATCHES: dict[str, Callable[..., torch.nn.Module]] = {"llava": patch_llava}


def patch(model: torch.nn.Module, **options) -> torch.nn.Module:
    """Patch ``model`` with the function registered for its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PATCHES:
        raise ValueError(f"no fastnest patch for model_type {model_type!r}; supported: {sorted(PATCHES)}")
    return PATCHES[model_type](model, **options)


__all__ = ["PATCHES", "MatryoshkaCausalLMOutput", "patch", "patch_llava", "set_scale", "unpatch"]
