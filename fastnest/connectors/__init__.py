"""Connectors: drop-in replacements for an LMM's vision-to-language projector."""

from .pooled import MatryoshkaProjector
from .query import MatryoshkaQueryTransformer

__all__ = ["MatryoshkaProjector", "MatryoshkaQueryTransformer"]
