"""Matryoshka settings stored in a model's config (``config.fastnest``), so that ``from_pretrained`` followed by
``fastnest.patch(model)`` restores them: ``{"scales": [...]}`` for a pooled LLaVA, ``{"num_tokens": ...}`` for
an MQT-LLaVA (its connector's own options are ``MQTLlavaConfig`` fields). Arguments passed to a patch function
win over them."""

from __future__ import annotations

import torch

CONFIG_ATTRIBUTE = "fastnest"


def stored_setting(model: torch.nn.Module, name: str, default):
    """``model.config.fastnest[name]`` (JSON lists as tuples), or ``default`` when the config stores none."""
    settings = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if settings is None:
        return default
    if not isinstance(settings, dict):
        raise ValueError(
            f"config.{CONFIG_ATTRIBUTE} must be a dict of fastnest settings such as {{'scales': [1, 9, 36]}}, "
            f"got {settings!r}"
        )
    value = settings.get(name, default)
    return tuple(value) if isinstance(value, list) else value


def store_settings(config, **settings) -> None:
    """Record ``settings`` (JSON values) in ``config`` for ``stored_setting`` to read after a save and load."""
    setattr(config, CONFIG_ATTRIBUTE, settings)
