"""Inference at a chosen scale through Hugging Face's own code path.

The patched ``forward`` / ``generate`` cut each image's placeholder run to its scale's token count (in
``input_ids`` or ``inputs_embeds``, ``attention_mask`` and ``labels``; rows re-padded on the caller's side),
then call the model's own ``forward`` / ``generate`` while a call context names each image's scale; the
model's ``get_image_features`` (replaced on the instance) then returns each image's features pooled to it.
Sampling, beam search, assisted decoding, caches, ``return_dict=False`` and every output option are thus
Hugging Face's, at the shorter sequence. Inputs that already hold each image at its scale pass unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..constants import IGNORE_INDEX
from ..plan import scaled_columns
from .state import PatchState, patch_state


@dataclass(frozen=True)
class _Call:
    model: nn.Module  # the patched model whose own forward/generate runs
    scales: tuple[int, ...]  # per image, in batch order


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fastnest_call", default=None)
# Inside one scale="auto" call: the last tower pass, [model, pixel_values, its version, the options' key, outputs]
_TOWER: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastnest_tower", default=None)


def active(model: nn.Module) -> bool:
    """True inside this model's own forward/generate started by fastnest (its inputs are at scale)."""
    call = _CALL.get()
    return call is not None and call.model is model


@contextlib.contextmanager
def calling(model: nn.Module, scales: Sequence[int]) -> Iterator[None]:
    token = _CALL.set(_Call(model, tuple(scales)))
    try:
        yield
    finally:
        _CALL.reset(token)


@contextlib.contextmanager
def one_tower_pass() -> Iterator[None]:
    """A ``scale="auto"`` call: its routing pass and its chosen-scale pass see the same images, so the second
    reuses the first's tower outputs when it records no graph (grad off, the model in eval mode); pooling and
    the connector run per pass, at each pass's scales. Any other images, options or an in-place change to
    ``pixel_values`` run the tower again."""
    token = _TOWER.set([])
    try:
        yield
    finally:
        _TOWER.reset(token)


def _tower_outputs(model: nn.Module, pixel_values: torch.Tensor, layer, strategy, image_sizes, options: dict):
    """The adapter's ``vision_outputs``, reused within :func:`one_tower_pass`."""
    state, seen = patch_state(model), _TOWER.get()
    if seen is None or model.training or torch.is_grad_enabled():
        return state.adapter.vision_outputs(model, pixel_values, layer, strategy, image_sizes=image_sizes, **options)
    # None is the config's layer / strategy (LLaVA-NeXT's generate passes None, its forward the config's values)
    config = model.config
    layer = getattr(config, "vision_feature_layer", None) if layer is None else layer
    strategy = getattr(config, "vision_feature_select_strategy", None) if strategy is None else strategy
    # use_cache comes with the language model's kwargs (the routing pass sets it) and means nothing to a tower
    named = {"layer": layer, "strategy": strategy, "image_sizes": image_sizes, **options}
    named.pop("use_cache", None)
    key = sorted((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in named.items())  # tensors: identity
    # the model too: another patched model called inside this call (an assistant) has its own tower
    if seen and seen[0] is model and seen[1] is pixel_values and seen[2:4] == [pixel_values._version, key]:
        return seen[4]
    result = state.adapter.vision_outputs(model, pixel_values, layer, strategy, image_sizes=image_sizes, **options)
    seen[:] = [model, pixel_values, pixel_values._version, key, result]
    return result


def image_scales(state: PatchState, scale: int | Sequence[int] | None, num_images: int) -> list[int]:
    """Each image's scale: ``scale`` (one for all, or one per image), else the enclosing fastnest call's (an
    assistant model inside generate), else the default (``set_scale``)."""
    if scale is None:
        outer = _CALL.get()
        if outer is not None and len(outer.scales) == num_images:
            return list(outer.scales)
        return [state.scale] * num_images
    if isinstance(scale, int) and not isinstance(scale, bool):
        state.spec.index(scale)
        return [scale] * num_images
    scales = list(scale) if isinstance(scale, Sequence) and not isinstance(scale, str) else None
    if scales is None or len(scales) != num_images:
        raise ValueError(
            f"scale must be one int, 'auto' (a fitted scale router) or a sequence of one scale per image "
            f"({num_images} images), got {scale!r}"
        )
    for s in scales:
        state.spec.index(s)
    return scales


def _placeholders(model, input_ids, inputs_embeds, token_id: int) -> torch.Tensor:
    """bool ``[B, L]``: image placeholders, found as Llava finds them (ids, else embeddings equal to the
    image token's)."""
    if input_ids is not None:
        return input_ids == token_id
    embed = model.get_input_embeddings()
    token = embed(torch.tensor(token_id, device=embed.weight.device)).to(inputs_embeds.device, inputs_embeds.dtype)
    return (inputs_embeds == token).all(-1)


@dataclass(frozen=True)
class Cut:
    """Where a batch is cut: ``index [B, W]`` of the kept columns (-1: padding), the new ``mask``, and the
    original ``valid`` / ``is_image`` masks."""

    index: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    is_image: torch.Tensor


def cut_of(
    model, scales: Sequence[int], pixel_values: torch.Tensor, batch: dict, left: bool, image_sizes=None
) -> Cut | None:
    """The cut that takes each image's placeholder run of ``batch`` (``input_ids`` or ``inputs_embeds``,
    ``attention_mask``) to its scale's count; None when the batch already holds those counts."""
    state = patch_state(model)
    token_id = state.adapter.image_token_id(model)
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    if ids is None and embeds is None:
        raise ValueError("with pixel_values, pass input_ids or inputs_embeds")
    reference = ids if ids is not None else embeds[..., 0]
    mask = batch.get("attention_mask")
    valid = torch.ones_like(reference, dtype=torch.bool) if mask is None else mask.bool()
    is_image = _placeholders(model, ids, embeds, token_id) & valid
    layouts = state.adapter.image_layouts(model, state.spec, pixel_values, image_sizes)
    full = [layout.placeholders for layout in layouts]
    counts = [layout.count(state.spec.index(s)) for layout, s in zip(layouts, scales)]
    cut = scaled_columns(valid.cpu(), is_image.cpu(), full, counts, left=left, image_token_id=token_id)
    if cut is None:
        return None
    index, new_mask = cut
    return Cut(index, new_mask.to(reference.device, mask.dtype if mask is not None else torch.long), valid, is_image)


def apply_cut(model, batch: dict, cut: Cut) -> dict:
    """``batch``'s ``input_ids`` / ``inputs_embeds`` / ``labels`` at the cut's columns, with its mask."""
    _check_cut_labels(batch.get("labels"), cut.valid, cut.is_image)
    pad_id = model.config.text_config.pad_token_id or 0
    pads = {"input_ids": pad_id, "labels": IGNORE_INDEX, "inputs_embeds": 0.0}
    out = {name: _take(t, cut.index, pads[name]) for name, t in batch.items() if t is not None and name in pads}
    out["attention_mask"] = cut.mask
    return out


def shrink(model, scales: Sequence[int], pixel_values: torch.Tensor, batch: dict, left: bool, image_sizes=None) -> dict:
    """``batch`` (``input_ids`` / ``inputs_embeds``, ``attention_mask``, ``labels``, optional) with each image's
    placeholder run cut to its scale's count; unchanged when it already holds them."""
    cut = cut_of(model, scales, pixel_values, batch, left, image_sizes)
    return dict(batch) if cut is None else apply_cut(model, batch, cut)


def _check_cut_labels(labels: torch.Tensor | None, valid: torch.Tensor, is_image: torch.Tensor) -> None:
    """A label on a placeholder or on padding would be dropped with it when the sequence is cut."""
    if labels is None:
        return
    for where, bad in (("padding (attention_mask == 0)", ~valid), ("image placeholder", is_image)):
        hit = (labels != IGNORE_INDEX) & bad.to(labels.device)
        if bool(hit.any()):
            row, col = (int(i) for i in hit.nonzero()[0])
            raise ValueError(
                f"labels must be {IGNORE_INDEX} at {where} positions to evaluate at a smaller scale: found "
                f"{int(hit.sum())} labelled, first at row {row}, column {col}; set them to {IGNORE_INDEX}"
            )


def _take(t: torch.Tensor, index: torch.Tensor, pad) -> torch.Tensor:
    """``t [B, L, ...]`` at ``index [B, W]`` (-1: ``pad``)."""
    index = index.to(t.device)
    shape = (*index.shape, *t.shape[2:])
    picked = t.gather(1, index.clamp(min=0).view(*index.shape, *[1] * (t.dim() - 2)).expand(shape))
    return picked.masked_fill((index < 0).view(*index.shape, *[1] * (t.dim() - 2)), pad)


def _arguments(method, instance, args: tuple, kwargs: dict) -> dict:
    """``method(instance, *args, **kwargs)``'s arguments by name, those it takes as ``**kwargs`` among them."""
    signature = inspect.signature(method)
    named = signature.bind(instance, *args, **kwargs).arguments
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
    named.pop(next(iter(signature.parameters)))  # the instance
    return dict(named)


def image_features(inner: nn.Module, *args, **kwargs):
    """The patched model's ``get_image_features`` (bound on its multimodal module): inside a fastnest call,
    each image's features pooled to its scale; elsewhere Hugging Face's own. Arguments as the family's own
    method takes them (LLaVA-NeXT passes ``image_sizes`` second, by position)."""
    call = _CALL.get()
    own = type(inner).get_image_features
    if call is None or patch_state(call.model).adapter.multimodal(call.model) is not inner:
        return own(inner, *args, **kwargs)
    options = _arguments(own, inner, args, kwargs)
    pixel_values, image_sizes = options.pop("pixel_values"), options.pop("image_sizes", None)
    layer = options.pop("vision_feature_layer", None)
    strategy = options.pop("vision_feature_select_strategy", None)
    model, state = call.model, patch_state(call.model)
    scales, count = call.scales, state.adapter.num_images(pixel_values, image_sizes)
    if len(scales) != count:  # generate repeats each image for num_return_sequences / beams
        repeat, rest = divmod(count, len(scales))
        if rest or not repeat:
            raise ValueError(f"{count} images reached the model for {len(scales)} scales")
        scales = [s for s in scales for _ in range(repeat)]
    options.pop("return_dict", None)
    outputs, feats = _tower_outputs(model, pixel_values, layer, strategy, image_sizes, options)
    pooled = state.adapter.scaled_features(model, feats, scales, state.spec, state.backend, pixel_values, image_sizes)
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=pooled,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def scaled_inputs(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    scale: int | Sequence[int] | None = None,
    padding_side: str | None = None,
    image_sizes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The batch exactly as a patched model's forward hands it to Hugging Face at ``scale`` (one scale, or one
    per image): each image's placeholder run cut to its scale's count, rows padded on ``padding_side``
    ("left", "right"; default: as the caller padded). Returns the given tensors so shortened, with the new
    ``attention_mask``; a batch already at scale comes back as given. ``image_sizes``: LLaVA-NeXT's."""
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    state = patch_state(model)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "inputs_embeds": inputs_embeds}
    if pixel_values is None:
        image_scales(state, scale, 0)
        return {k: v for k, v in batch.items() if v is not None}
    scales = image_scales(state, scale, state.adapter.num_images(pixel_values, image_sizes))
    left = padding_side == "left" if padding_side is not None else left_padded(attention_mask)
    shrunk = shrink(model, scales, pixel_values, batch, left, image_sizes)
    return {k: v for k, v in shrunk.items() if v is not None}


def left_padded(attention_mask: torch.Tensor | None) -> bool:
    if attention_mask is None:
        return False
    return not bool((attention_mask[:, -1] == 0).any()) and bool((attention_mask[:, 0] == 0).any())
