"""fastnest in the original LLaVA code (haotian-liu/LLaVA, ``llava-torch`` 1.2.2, transformers 4.36).

``patch(model)`` makes an original-format ``LlavaLlamaForCausalLM`` (or ``LlavaMistralForCausalLM``) train on
every Matryoshka scale in one packed pass and infer at any scale; only fastnest's core is used.

Inputs are the original format: ``input_ids`` with ONE ``IMAGE_TOKEN_INDEX`` (-200) marker where each image
goes, ``labels`` (-100 on the prompt), ``attention_mask`` and ``images [N, 3, H, W]``; as in the original
code, a row with m markers takes the next m images and a text-only row takes one (the blank image LLaVA's
dataset gives it), which is not used. Training (``model.train()`` with labels): the released M3 loss, the mean
over scales of each scale's token-mean next-token cross-entropy, from one packed varlen pass (tower and
projector once, the fused pooling kernels, the answer-only fused loss). Everything else (eval forward,
``generate``) is the original code, with each image's features pooled to the call's ``scale`` (or the fork's
keyword ``matryoshka_vis_token_scale``; default: the largest patched scale).

Differences from the released M3 fork, on purpose: the tower receives gradients when its parameters require
grad (the fork's tower runs under ``no_grad``); the eval forward honours the scale (the fork's uses 576
tokens); a text-only row and each row's text before its first image run once, not once per scale (the loss
and gradients are the fork's).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..constants import DEFAULT_SCALES
from ..dispatch import check_backend
from ..instance_method import InstanceMethod
from ..layout import pooled_grid
from ..ops.projector.function import matryoshka_project
from ..scales import MatryoshkaScales
from ..step import packed_step, step_loss
from .llava_original_decoder import packed_decoder, route, unroute

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX: the one token that marks an image in input_ids
_ATTRIBUTE = "_fastnest_llava_original"
_UNSUPPORTED_IN_TRAINING = ("position_ids", "past_key_values", "inputs_embeds")


@dataclass(frozen=True)
class OriginalPatch:
    """How an original-LLaVA model is patched: its scales, default inference scale and backends."""

    spec: MatryoshkaScales
    scale: int  # inference scale when a call names none
    attention: str  # packed training attention: "auto" or a backend of fastnest.dispatch
    share_prefix: bool
    backend: str | None  # kernels of fastnest's projector and loss (None: chosen per device)


@dataclass
class MatryoshkaOutput(CausalLMOutputWithPast):
    """The training step's output: ``loss`` (the mean over scales), ``scale_losses`` (detached, in ``scales``
    order) and ``lm_tokens`` (tokens the packed pass ran). No ``logits``: the loss never builds them in full."""

    scale_losses: torch.Tensor | None = None
    scales: tuple[int, ...] | None = None
    lm_tokens: int | None = None


def patch_state(model: nn.Module) -> OriginalPatch:
    state = getattr(getattr(model, "module", model), _ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched; call fastnest.integrations.llava_original.patch(model)")
    return state


def _tower(model: nn.Module) -> nn.Module:
    """The loaded CLIP tower, its features the ones the projector reads (patch tokens on a square grid)."""
    tower = model.get_vision_tower()
    if tower is None:
        raise ValueError("the model has no vision tower (config.mm_vision_tower is unset)")
    if not getattr(tower, "is_loaded", False):
        raise ValueError(
            "the vision tower is not loaded: call model.get_vision_tower().load_model() first (llava/train/train.py's "
            "initialize_vision_modules and llava.model.builder.load_pretrained_model do)"
        )
    if tower.select_feature != "patch":
        raise ValueError(
            f"mm_vision_select_feature={tower.select_feature!r} keeps the CLS token, which has no place on the pooling "
            "grid; fastnest supports 'patch'"
        )
    return tower


def patch(
    model: nn.Module,
    scales: tuple[int, ...] = DEFAULT_SCALES,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Patch an original-LLaVA model in place (and return it); calling again re-configures.

    ``scales``: token counts per image (each pools the tower's grid evenly: 1, 9, 36, 144, 576 for 24x24).
    ``attention``: the packed training pass's backend (``"auto"``: flash, else xformers on CUDA; sdpa on CPU;
    or ``"flash"``, ``"xformers"``, ``"flex"``, ``"sdpa"``); inference keeps the model's own attention.
    ``share_prefix``: each row's text before its first image runs once for all scales (the same loss).
    ``backend``: fastnest's projector and loss kernels ("triton", "native", "torch"; None: per device).
    """
    for method in ("get_model", "get_vision_tower", "encode_images", "prepare_inputs_labels_for_multimodal"):
        if not callable(getattr(model, method, None)):
            raise TypeError(
                f"patch expects an original-LLaVA model (llava.model.LlavaLlamaForCausalLM or LlavaMistralForCausalLM),"
                f" got {type(model).__name__}, which has no {method}()"
            )
    if isinstance(scales, (int, str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"scales must be a sequence of ints such as {DEFAULT_SCALES}, got {scales!r}")
    if not isinstance(model.lm_head, nn.Linear):
        raise ValueError(f"the fused loss reads lm_head's weight and needs an nn.Linear, got {type(model.lm_head)}")
    spec = MatryoshkaScales(_tower(model).num_patches_per_side, scales)
    check_backend("attention", attention)
    if backend not in (None, "auto"):
        check_backend("projector", backend)
    route(model.get_model())  # ValueError for a decoder that is not Llama-style (MPT)
    state = OriginalPatch(spec, max(spec.scales), attention, bool(share_prefix), backend)
    setattr(model, _ATTRIBUTE, state)
    for name, impl in (("forward", _forward), ("generate", _generate), ("encode_images", _encode_images)):
        setattr(model, name, InstanceMethod(impl, model, getattr(type(model), name)))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """The original code's behaviour again."""
    patch_state(model)
    unroute(model.get_model())
    for name in ("forward", "generate", "encode_images", _ATTRIBUTE):
        model.__dict__.pop(name, None)
    return model


# --- inference: the original code, each image pooled to the call's scale -------------------------------------


@dataclass(frozen=True)
class _Call:
    model: nn.Module
    scale: int


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fastnest_llava_original", default=None)


def _asked_scale(scale: int | None, released: int | None) -> int | None:
    """The scale a call asks for: ``scale`` or the released fork's ``matryoshka_vis_token_scale``."""
    if scale is not None and released is not None and scale != released:
        raise ValueError(f"scale={scale} and matryoshka_vis_token_scale={released} disagree; pass one")
    return scale if scale is not None else released


@contextlib.contextmanager
def _at_scale(model: nn.Module, scale: int | None) -> Iterator[None]:
    """Images reaching this model's ``encode_images`` meanwhile are pooled to ``scale`` (None: the enclosing
    call's, e.g. generate's, else the patch's default)."""
    outer = _CALL.get()
    if scale is None:
        scale = outer.scale if outer is not None and outer.model is model else patch_state(model).scale
    patch_state(model).spec.index(scale)  # ValueError naming the patched scales
    token = _CALL.set(_Call(model, scale))
    try:
        yield
    finally:
        _CALL.reset(token)


def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
    """The original ``encode_images`` (the tower's own forward, then the projector) at the call's scale."""
    call, state = _CALL.get(), patch_state(self)
    scale = call.scale if call is not None and call.model is self else state.scale
    feats = self.get_model().get_vision_tower()(images)
    return matryoshka_project(feats, self.get_model().mm_projector, state.spec.only(scale), state.backend)


def _generate(self, *args, scale: int | None = None, matryoshka_vis_token_scale: int | None = None, **kwargs):
    with _at_scale(self, _asked_scale(scale, matryoshka_vis_token_scale)):
        return type(self).generate(self, *args, **kwargs)


def _forward(self, *args, scale: int | None = None, matryoshka_vis_token_scale: int | None = None, **kwargs):
    own = type(self).forward
    scale = _asked_scale(scale, matryoshka_vis_token_scale)
    call = inspect.signature(own).bind(self, *args, **kwargs).arguments
    if not (self.training and call.get("labels") is not None):
        with _at_scale(self, scale):
            return own(self, *args, **kwargs)
    if scale is not None:
        raise ValueError(f"scale={scale} is for inference; training runs every patched scale")
    for name in _UNSUPPORTED_IN_TRAINING:
        if call.get(name) is not None:
            raise ValueError(f"{name} is not supported by the fastnest training step; pass input_ids and images")
    for name in ("output_attentions", "output_hidden_states"):
        if call.get(name):
            raise ValueError(f"{name}=True is not supported by the fastnest training step (one packed pass)")
    out = training_step(self, call.get("input_ids"), call.get("attention_mask"), call["labels"], call.get("images"))
    return_dict = call.get("return_dict")
    return out if (return_dict if return_dict is not None else self.config.use_return_dict) else out.to_tuple()


# --- training: one packed pass ----------------------------------------------------------------------------------


class _Bound:
    """An original-LLaVA model as ``fastnest.step`` sees it (a ``StepModel``)."""

    def __init__(self, model: nn.Module, state: OriginalPatch) -> None:
        self.model, self.state = model, state
        self.layout = pooled_grid(state.spec, placeholders=1)  # one marker token per image

    def image_layouts(self, images: torch.Tensor | None):
        return [] if images is None else [self.layout] * images.shape[0]

    def visual_rows(self, images: torch.Tensor) -> torch.Tensor:
        tower = _tower(self.model)
        # the tower's own model and feature selection, without its forward's no_grad: it trains when it
        # requires grad; features in the images' dtype, as the original forward returns them
        out = tower.vision_tower(images.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
        feats = tower.feature_select(out).to(images.dtype)
        rows = matryoshka_project(feats, self.model.get_model().mm_projector, self.state.spec, self.state.backend)
        return rows.reshape(-1, rows.shape[-1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.get_model().embed_tokens
        return embed(input_ids.to(embed.weight.device, non_blocking=True))

    def language_model(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, info, rows: torch.Tensor, tail=None
    ) -> torch.Tensor:
        return packed_decoder(self.model.get_model(), embeds, position_ids, info)[rows]


def spliced_images(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images) -> torch.Tensor | None:
    """The images the original code splices in, in order: a row with m markers takes the next m images, a
    text-only row takes one and drops it (LLaVA's dataset gives text-only samples a blank image)."""
    if images is None:
        return None
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else f"a {type(images).__name__}"
        raise ValueError(
            f"images must be one [N, 3, H, W] tensor (the collator stacks equal-size images: image_aspect_ratio "
            f"'pad' or 'square'), got {shape}; lists and 5-D (anyres) batches are not supported in training"
        )
    ids = input_ids.detach().cpu()
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    markers = ((ids == IMAGE_TOKEN_INDEX) & valid).sum(1).tolist()
    take, at = [], 0
    for m in markers:
        take += range(at, at + m)
        at += max(m, 1)
    if at != images.shape[0]:
        raise ValueError(
            f"got {images.shape[0]} images for rows with {markers} image markers: the original code takes one image "
            f"per marker and one (unused) per text-only row, {at} here"
        )
    return images if len(take) == at else images[torch.tensor(take, dtype=torch.long, device=images.device)]


def _check_not_partitioned(model: nn.Module) -> None:
    """DeepSpeed ZeRO-3 keeps each parameter sharded outside its module's own forward; the fused loss and
    projector read lm_head's and mm_projector's weights directly."""
    for name, module in (("lm_head", model.lm_head), ("mm_projector", model.get_model().mm_projector)):
        if any(hasattr(p, "ds_status") for p in module.parameters()):
            raise ValueError(
                f"{name}'s parameters are partitioned by DeepSpeed ZeRO-3, and the fastnest step reads them directly; "
                "train with ZeRO-2 (LLaVA's scripts/zero2.json)"
            )


def training_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    images: torch.Tensor | None,
) -> MatryoshkaOutput:
    """The packed all-scale step of a patched model: ``loss`` as the released M3 fork computes it."""
    state = patch_state(model)
    _check_not_partitioned(model)
    step = packed_step(
        _Bound(model, state),
        input_ids,
        attention_mask,
        labels,
        spliced_images(input_ids, attention_mask, images),
        image_token_id=IMAGE_TOKEN_INDEX,
        attention=state.attention,
        share_prefix=state.share_prefix,
        max_length=getattr(model.config, "tokenizer_model_max_length", None),  # the original truncates there
    )
    loss, per_scale = step_loss(step, model.lm_head, len(state.spec.scales), backend=state.backend)
    return MatryoshkaOutput(
        loss=loss, scale_losses=per_scale.detach(), scales=state.spec.scales, lm_tokens=step.lm_tokens
    )


__all__ = ["IMAGE_TOKEN_INDEX", "MatryoshkaOutput", "OriginalPatch", "patch", "patch_state", "training_step", "unpatch"]
