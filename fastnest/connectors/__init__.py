"""Connectors: drop-in replacements for an LMM's vision-to-language projector."""

from .pooled import MatryoshkaProjector

__all__ = ["MatryoshkaProjector"]
