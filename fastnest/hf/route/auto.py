"""``scale="auto"``: the routing pass, the router's choice per row, and each image's scale from its row.

The router is the patch state's (``load_router``); when none is attached, the first ``scale="auto"`` call loads
the one saved beside the model (``<model.name_or_path>/router/``, written by ``fastnest route``). It must have
been fitted for scales the patch allows. Every image of a row takes the row's scale (one routing feature vector
per row: ``features``). Inputs must hold each image's placeholder run at full scale (the processor's default):
that is how each image is assigned to its row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..state import patch_state, set_state
from .features import routing_features
from .files import ROUTER_DIR, read_router, router_dir
from .head import Router

AUTO = "auto"


def load_router(model: torch.nn.Module, path: str | Path | None = None) -> Router:
    """Attach the router saved in ``path`` (a model directory with ``router/``, or that folder; default: the
    directory the model was loaded from) to a patched model, for ``scale="auto"``; returns it."""
    state = patch_state(model)
    where = path if path is not None else getattr(model, "name_or_path", "")
    if not where:
        raise ValueError("the model was not loaded from a directory: pass the router's path to fastnest.load_router")
    router, _ = read_router(where)
    wrong = [s for s in router.scales if not _allowed(state, s)]
    if wrong:
        raise ValueError(
            f"the router in {where} was fitted for scales {router.scales}, but the patch does not allow {wrong} "
            f"(its scales: {state.spec.scales}); patch with scales={router.scales} or refit with `fastnest route`"
        )
    set_state(model, replace(state, router=router))
    return router


def _allowed(state, scale: int) -> bool:
    try:
        state.spec.index(scale)
    except ValueError:
        return False
    return True


def attached_router(model: torch.nn.Module) -> Router:
    """The patch's router, loaded from beside the model on first use; ValueError naming the fix when none."""
    router = patch_state(model).router
    if router is not None:
        return router
    where = getattr(model, "name_or_path", "")
    if where and (router_dir(where) / "router.json").is_file():
        return load_router(model, where)
    raise ValueError(
        f"scale='auto' needs a scale router and none is attached{f' (none in {where}/{ROUTER_DIR}/)' if where else ''}: "
        "fit one with `fastnest route --model DIR` and load it with fastnest.load_router(model, DIR)"
    )


def images_per_row(model, input_ids, attention_mask, pixel_values, image_sizes=None) -> list[int]:
    """How many of ``pixel_values``' images each row holds, from its full-scale placeholder runs."""
    state = patch_state(model)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    have = ((input_ids == state.adapter.image_token_id(model)) & valid).sum(dim=1).tolist()
    full = [layout.placeholders for layout in state.adapter.image_layouts(model, state.spec, pixel_values, image_sizes)]
    counts, image = [], 0
    for b, n in enumerate(have):
        start = image
        while n > 0 and image < len(full) and n >= full[image]:
            n -= full[image]
            image += 1
        if n:
            raise ValueError(
                f"scale='auto' assigns images to rows by their full-scale placeholder runs: row {b} holds "
                f"{have[b]} placeholders, not a whole number of its images' ({full[start : start + 1]} ...); pass the "
                "processor's full-scale input_ids"
            )
        counts.append(image - start)
    if image != len(full):
        raise ValueError(f"input_ids hold placeholders for {image} images, pixel_values {len(full)}")
    return counts


def route_scales(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    budget: float | None = None,
    image_sizes: torch.Tensor | None = None,
) -> list[int]:
    """The scale ``scale="auto"`` gives each image of the batch (batch order): the routing pass at the router's
    smallest scale, the router's choice for each row at ``budget`` (default: the router's), the row's scale for
    each of its images."""
    if input_ids is None:
        raise ValueError("scale='auto' reads the prompt from input_ids; pass input_ids (not inputs_embeds)")
    if pixel_values is None:
        return []
    router = attached_router(model)
    counts = images_per_row(model, input_ids, attention_mask, pixel_values, image_sizes)
    features = routing_features(
        model, input_ids, attention_mask, pixel_values, labels, scale=router.scales[0], image_sizes=image_sizes
    )
    rows = router.choose(features, budget)
    return [s for s, n in zip(rows, counts) for _ in range(n)]


def resolve(model, scale, budget, input_ids, attention_mask, pixel_values, labels=None, image_sizes=None):
    """``scale`` as the patched forward/generate take it: "auto" becomes the routed per-image scales."""
    if scale != AUTO:
        if budget is not None:
            raise ValueError(f"budget={budget!r} applies to scale='auto' only (got scale={scale!r})")
        return scale
    if pixel_values is None:
        return None  # no image to route
    return route_scales(model, input_ids, attention_mask, pixel_values, labels, budget=budget, image_sizes=image_sizes)
