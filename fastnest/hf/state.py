"""The patch state a patched model carries, and the public accessor for it (nothing else reads the attribute)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..scales import TokenCounts

if TYPE_CHECKING:
    from .adapter import ModelAdapter
    from .route.head import Router

_ATTRIBUTE = "_fastnest"


@dataclass(frozen=True)
class PatchState:
    """How a model is patched: its family's adapter, its scales (the token counts inference allows, and the
    ones training runs unless ``draw`` picks them per step), the default inference scale, the backends of
    its packed pass, and the router of ``scale="auto"`` once loaded."""

    adapter: ModelAdapter
    spec: TokenCounts
    scale: int  # default inference scale
    backend: str | None  # kernels of fastnest's own ops (fastnest.dispatch); None: chosen per device
    attention: str  # backend of the packed forward ("auto" or a name in fastnest.dispatch.OPS["attention"])
    share_prefix: bool
    draw: Callable[[], TokenCounts] | None = None  # the counts of the next training step (None: ``spec``)
    lm_kernels: str = "auto"  # the language model's fused elementwise ops in the packed pass (hf/lm_kernels.py)
    router: Router | None = None  # scale="auto"'s scale router (fastnest.load_router)

    def training_spec(self) -> TokenCounts:
        """The token counts the next training step runs (drawn anew per call when ``draw`` is set)."""
        return self.spec if self.draw is None else self.draw()

    def with_scale(self, scale: int) -> PatchState:
        self.spec.index(scale)
        return replace(self, scale=scale)


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _ATTRIBUTE, None) is not None


def patch_state(model: torch.nn.Module) -> PatchState:
    """The state of a patched model (a DDP wrapper's inner model too); ValueError when it is not patched."""
    state = getattr(getattr(model, "module", model), _ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched by fastnest; call fastnest.patch(model) or fastnest.patch_llava(model)")
    return state


def set_state(model: torch.nn.Module, state: PatchState | None) -> None:
    """Attach (or, with None, remove) the patch state."""
    if state is None:
        model.__dict__.pop(_ATTRIBUTE, None)
    else:
        setattr(model, _ATTRIBUTE, state)
