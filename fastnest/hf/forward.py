"""The patched ``forward`` and ``generate``: the packed all-scale training step, else inference at a scale.

Training goes through ``fastnest.step`` with a :class:`BoundModel` (the patched model, its adapter and its
scale set), so the trainer, the analysis and the patched forward share one packed pass. Inference is Hugging
Face's own forward/generate at the shorter sequence (``fastnest.hf.inference``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from ..attention import VarlenInfo
from ..constants import IGNORE_INDEX
from ..scales import TokenCounts
from ..step import StepOutput, packed_step, step_loss
from . import attention as hf_attention
from . import inference, lm_kernels
from .output import MatryoshkaCausalLMOutput
from .route import auto
from .state import PatchState, patch_state

VISION_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


class BoundModel:
    """A patched model seen through its adapter at one scale set: what ``fastnest.step`` needs of it."""

    def __init__(self, model, state: PatchState, spec: TokenCounts, vision_options: dict | None = None):
        self.model, self.state, self.spec = model, state, spec
        self.adapter = state.adapter
        self.vision_options = {k: v for k, v in (vision_options or {}).items() if v is not None}
        self.image_sizes = self.vision_options.pop("image_sizes", None)  # the anyres families' layouts read them

    def image_layouts(self, pixel_values):
        return self.adapter.image_layouts(self.model, self.spec, pixel_values, self.image_sizes)

    def visual_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with record_function("fastnest.vision"):
            feats = self.adapter.vision_features(
                self.model, pixel_values, image_sizes=self.image_sizes, **self.vision_options
            )
        with record_function("fastnest.connector"):
            return self.adapter.visual_rows(self.model, feats, self.spec, self.state.backend, self.image_sizes)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        return embed(input_ids.to(embed.weight.device, non_blocking=True))

    def language_model(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, info: VarlenInfo, rows: torch.Tensor, tail=None
    ) -> torch.Tensor:
        decoder = self.adapter.language_model(self.model)
        kernels = lm_kernels.resolve(decoder, self.state.lm_kernels, embeds.device)
        return hf_attention.packed_call(decoder, embeds, position_ids, info, rows, kernels, tail)


def _pop_vision_options(kwargs: dict) -> dict:
    """The per-call vision options LLaVA's forward takes (None = the config's)."""
    return {k: kwargs.pop(k, None) for k in VISION_OPTIONS}


def packed_pass(
    model, input_ids, attention_mask, labels, pixel_values, *, share_prefix=None, vision_options=None, spec=None
) -> tuple[PatchState, StepOutput]:
    """A patched model's packed multi-scale pass (``fastnest.step.packed_step``) with its patch's backends,
    the given scales (default: the patch's) and (unless given) shared-prefix setting: the training step's
    and the analysis's."""
    state = patch_state(model)
    step = packed_step(
        BoundModel(model, state, state.spec if spec is None else spec, vision_options),
        input_ids,
        attention_mask,
        labels,
        pixel_values,
        image_token_id=state.adapter.image_token_id(model),
        attention=state.attention,
        share_prefix=state.share_prefix if share_prefix is None else share_prefix,
    )
    return state, step


def training_step(model, input_ids, attention_mask, pixel_values, labels, *, num_items=None, vision_options=None):
    """The packed all-scale step of a patched model and its loss (``MatryoshkaCausalLMOutput``)."""
    if num_items is not None and not float(num_items) > 0:
        raise ValueError(f"num_items_in_batch must be a positive count of target tokens, got {num_items}")
    spec = patch_state(model).training_spec()  # the patch's scales, or this step's drawn token counts
    state, step = packed_pass(
        model, input_ids, attention_mask, labels, pixel_values, vision_options=vision_options, spec=spec
    )
    loss, per_scale = step_loss(
        step, state.adapter.lm_head(model), len(spec.scales), num_items=num_items, backend=state.backend
    )
    return MatryoshkaCausalLMOutput(
        loss=loss, scale_losses=per_scale.detach(), lm_tokens=step.lm_tokens, scales=spec.scales
    )


def _labels_from_shifted(labels, shift_labels):
    """HF's ``shift_labels`` (position p predicts ``shift_labels[p]``) as ``labels`` (p predicts ``labels[p+1]``).
    As in Hugging Face, ``labels`` asks for a loss and ``shift_labels``, when given, are its targets."""
    if shift_labels is None:
        return labels
    if bool((shift_labels[:, -1] != IGNORE_INDEX).any()):
        raise ValueError(
            f"shift_labels has a target at the last position, which predicts past the sequence; set its last "
            f"column to {IGNORE_INDEX}"
        )
    return torch.nn.functional.pad(shift_labels[:, :-1], (1, 0), value=IGNORE_INDEX)


def _check_training_inputs(model, scale, kwargs: dict) -> None:
    for name in ("inputs_embeds", "past_key_values", "cache", "position_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported by the fastnest training step; pass input_ids and pixel_values")
    if scale is not None:
        raise ValueError(f"scale={scale} is for inference; training runs the token counts the model was patched with")


def patched_forward(self, *args, scale=None, **kwargs):
    with _tower_scope(self, scale):
        return _forward(self, *args, scale=scale, **kwargs)


def _tower_scope(model, scale):
    """``inference.one_tower_pass`` around a ``scale="auto"`` call of this model's own (the routing pass inside
    it is not one); nothing around any other call."""
    routed = isinstance(scale, str) and scale == auto.AUTO and not inference.active(model)
    return inference.one_tower_pass() if routed else contextlib.nullcontext()


def _forward(
    self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, scale=None, budget=None, **kwargs
):
    own = type(self).forward
    if inference.active(self):  # inside fastnest's own call: the inputs are at scale already
        return own(
            self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels, **kwargs
        )
    vision_options = _pop_vision_options(kwargs)
    if self.training and labels is not None:
        _check_training_inputs(self, scale, kwargs)
        if budget is not None:
            raise ValueError(f"budget={budget!r} is for scale='auto' at inference; training runs every scale")
        return training_step(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            _labels_from_shifted(labels, kwargs.pop("shift_labels", None)),
            num_items=kwargs.pop("num_items_in_batch", None),
            vision_options=vision_options,
        )
    options = {k: v for k, v in vision_options.items() if v is not None}
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    batch["inputs_embeds"] = kwargs.pop("inputs_embeds", None)
    state = patch_state(self)
    image_sizes = options.get("image_sizes")
    scale = auto.resolve(self, scale, budget, input_ids, attention_mask, pixel_values, labels, image_sizes)
    if pixel_values is None:  # text only, or a decode step with a cache: nothing to pool
        inference.image_scales(state, scale, 0)
        return own(self, **batch, **options, **kwargs)
    scales = inference.image_scales(state, scale, state.adapter.num_images(pixel_values, image_sizes))
    left = inference.left_padded(attention_mask)
    cut = inference.cut_of(self, scales, pixel_values, batch, left, image_sizes)
    if cut is None:  # at full scale (or already at scale) everything, shift_labels too, is Hugging Face's as given
        shrunk = batch
    else:  # the sequence gets shorter
        shift_labels = kwargs.pop("shift_labels", None)
        batch["labels"] = None if labels is None else _labels_from_shifted(labels, shift_labels)
        shrunk = inference.apply_cut(self, batch, cut)
        _follow_shortening(kwargs, shrunk)
    with inference.calling(self, scales):
        return own(self, **shrunk, pixel_values=pixel_values, **options, **kwargs)


def _follow_shortening(kwargs: dict, shrunk: dict) -> None:
    """Positions the caller computed for the full-length sequence do not describe the shorter one."""
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids describe the full-scale sequence; leave them to the model at a smaller scale")
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        width = shrunk["attention_mask"].shape[1]
        kwargs["cache_position"] = torch.arange(width, device=cache_position.device) + cache_position[0]


def patched_generate(self, *args, scale=None, **kwargs):
    with _tower_scope(self, scale):
        return _generate(self, *args, scale=scale, **kwargs)


def _generate(self, inputs=None, *args, scale=None, budget=None, **kwargs):
    own = type(self).generate
    if inference.active(self):
        return own(self, inputs, *args, **kwargs)
    pixel_values, image_sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
    input_ids = kwargs.pop("input_ids", inputs)
    scale = auto.resolve(self, scale, budget, input_ids, kwargs.get("attention_mask"), pixel_values, None, image_sizes)
    if pixel_values is None:
        inference.image_scales(patch_state(self), scale, 0)
        return own(self, input_ids, *args, **kwargs)
    state = patch_state(self)
    scales = inference.image_scales(state, scale, state.adapter.num_images(pixel_values, image_sizes))
    batch = {"input_ids": input_ids, "attention_mask": kwargs.pop("attention_mask", None)}
    batch["inputs_embeds"] = kwargs.pop("inputs_embeds", None)
    shrunk = inference.shrink(self, scales, pixel_values, batch, left=True, image_sizes=image_sizes)
    with inference.calling(self, scales):
        out = own(self, *args, **{k: v for k, v in shrunk.items() if v is not None}, **kwargs)
    if input_ids is None or shrunk["input_ids"] is input_ids:
        return out
    # Report the caller's prompt (every returned row: num_return_sequences, beams), then the new tokens.
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    full = torch.cat([prompt, sequences[:, shrunk["input_ids"].shape[1] :]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
