"""The patched ``forward`` and ``generate``: the packed all-scale training step, and inference at one scale.

Both go through ``fastnest.step`` with a :class:`BoundModel` (the patched model, its adapter and the scale
set of this call), so the trainer, the analysis and these methods share one packed pass.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from ..attention import VarlenInfo
from ..ops.cross_entropy.function import fused_linear_cross_entropy
from ..ops.cross_entropy.naive import grouped_cross_entropy
from ..packing import pad_packed
from ..scales import MatryoshkaScales
from ..step import StepOutput, packed_step, plan_batch
from . import attention as hf_attention
from .output import MatryoshkaCausalLMOutput
from .state import PatchState, patch_state

VISION_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


class BoundModel:
    """A patched model seen through its adapter at one scale set: what ``fastnest.step`` needs of it."""

    def __init__(self, model, state: PatchState, spec: MatryoshkaScales, vision_options: dict | None = None):
        self.model, self.state, self.spec = model, state, spec
        self.adapter = state.adapter
        self.vision_options = {k: v for k, v in (vision_options or {}).items() if v is not None}
        if self.vision_options.pop("image_sizes", None) is not None:
            raise ValueError("image_sizes is not supported: fastnest pools fixed-size LLaVA grids")

    def image_layouts(self, pixel_values):
        return self.adapter.image_layouts(self.model, self.spec, pixel_values)

    def visual_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with record_function("fastnest.vision"):
            feats = self.adapter.vision_features(self.model, pixel_values, **self.vision_options)
        with record_function("fastnest.connector"):
            rows = self.adapter.connector_rows(self.model, feats, self.spec, self.state.backend)
        return rows.reshape(-1, rows.shape[-1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        return embed(input_ids.to(embed.weight.device))

    def language_model(self, embeds: torch.Tensor, position_ids: torch.Tensor, info: VarlenInfo) -> torch.Tensor:
        with hf_attention.packed_forward():
            out = self.adapter.language_model(self.model)(
                inputs_embeds=embeds[None],
                position_ids=position_ids[None],
                use_cache=False,
                **{hf_attention.VARLEN_KWARG: info},
            )
        return out.last_hidden_state[0]


def _pop_vision_options(kwargs: dict) -> dict:
    """The per-call vision options LLaVA's forward takes (None = the config's)."""
    return {k: kwargs.pop(k, None) for k in VISION_OPTIONS}


def packed_pass(
    model, input_ids, attention_mask, labels, pixel_values, *, share_prefix=None, vision_options=None
) -> tuple[PatchState, StepOutput]:
    """A patched model's packed multi-scale pass (``fastnest.step.packed_step``) with its patch's scales,
    backends and (unless given) shared-prefix setting: the training step's and the analysis's."""
    state = patch_state(model)
    step = packed_step(
        BoundModel(model, state, state.spec, vision_options),
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
    state, step = packed_pass(model, input_ids, attention_mask, labels, pixel_values, vision_options=vision_options)
    loss, per_scale = _answer_loss(state.adapter.lm_head(model), step, len(state.spec.scales), num_items, state)
    return MatryoshkaCausalLMOutput(loss=loss, scale_losses=per_scale.detach(), lm_tokens=step.lm_tokens)


def _answer_loss(head, step: StepOutput, num_scales: int, num_items, state: PatchState):
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"the fastnest training step reads lm_head's weight for its fused loss and needs an nn.Linear, "
            f"got {type(head).__name__}"
        )
    device = head.weight.device
    # Hidden states at labelled positions only; the fused loss never holds more than one chunk of their logits.
    with record_function("fastnest.loss"):
        return fused_linear_cross_entropy(
            step.hidden.to(device),
            head.weight,
            step.packed.targets.to(device),
            step.packed.target_group.to(device),
            num_scales,
            bias=head.bias,
            num_items=num_items,
            backend=state.backend,
        )


def _padding_left(attention_mask: torch.Tensor | None) -> bool:
    if attention_mask is None:
        return False
    return not bool((attention_mask[:, -1] == 0).any()) and bool((attention_mask[:, 0] == 0).any())


def _scaled_inputs(model, input_ids, attention_mask, pixel_values, labels, scale, left, vision_options):
    """The batch as the language model sees it at ``scale``: padded embeddings, mask, ids and the plan."""
    state = patch_state(model)
    bound = BoundModel(model, state, state.spec.only(state.scale if scale is None else scale), vision_options)
    token_id = state.adapter.image_token_id(model)
    plan, source = plan_batch(
        bound, input_ids, attention_mask, labels, pixel_values, image_token_id=token_id, share_prefix=False
    )
    index, mask, where = pad_packed(plan.packed, pad_index=source.shape[0] - 1, left=left)
    # Token ids of that sequence (placeholders at pooled positions), for generate's bookkeeping; built where
    # input_ids live, so a plain forward pays no device-to-host copy for it.
    ids_device = input_ids.device
    ids_source = torch.cat(
        [
            input_ids[plan.text_mask.to(ids_device)],
            torch.full((plan.num_visual_rows,), token_id, device=ids_device),
            torch.tensor([model.config.text_config.pad_token_id or 0], device=ids_device),
        ]
    )
    device = source.device
    return source[index.to(device)], mask.to(device), ids_source[index.to(ids_device)], plan, where


def patched_forward(
    self,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    labels=None,
    scale: int | None = None,
    num_items_in_batch=None,
    **kwargs,
):
    vision_options = _pop_vision_options(kwargs)
    if self.training and labels is not None:
        for name in ("inputs_embeds", "past_key_values", "position_ids"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by the fastnest training step; pass input_ids and pixel_values"
                )
        if scale is not None:
            raise ValueError(
                f"scale={scale} is for inference; training always runs every scale {patch_state(self).spec.scales}"
            )
        return training_step(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            labels,
            num_items=num_items_in_batch,
            vision_options=vision_options,
        )
    if pixel_values is None:  # text-only or a decode step with a KV cache: nothing to pool
        return _text_forward(self, input_ids, attention_mask, labels, scale, num_items_in_batch, vision_options, kwargs)
    if input_ids is None or kwargs.get("position_ids") is not None:
        raise ValueError("with pixel_values, fastnest needs input_ids and builds position_ids itself")
    embeds, mask, _, plan, where = _scaled_inputs(
        self, input_ids, attention_mask, pixel_values, labels, scale, _padding_left(attention_mask), vision_options
    )
    out = type(self).forward(self, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    loss = None
    if labels is not None:
        packed = plan.packed.to(embeds.device)
        flat = out.logits.reshape(-1, out.logits.shape[-1])[where.to(embeds.device)[packed.logit_index]]
        loss, _ = grouped_cross_entropy(flat, packed.targets, packed.target_group, 1, num_items_in_batch)
    return MatryoshkaCausalLMOutput(
        loss=loss,
        logits=out.logits,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        attention_mask=mask,
    )


def _text_forward(model, input_ids, attention_mask, labels, scale, num_items, vision_options, kwargs):
    if scale is not None:
        patch_state(model).spec.index(scale)
    extra = {**vision_options, "num_items_in_batch": num_items}
    return type(model).forward(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        **kwargs,
        **{k: v for k, v in extra.items() if v is not None},
    )


def patched_generate(self, inputs=None, *args, scale: int | None = None, **kwargs):
    cls_generate = type(self).generate
    pixel_values = kwargs.pop("pixel_values", None)
    input_ids = kwargs.pop("input_ids", inputs)
    if pixel_values is None:
        if scale is not None:
            patch_state(self).spec.index(scale)
        return cls_generate(self, input_ids, *args, **kwargs)
    vision_options = _pop_vision_options(kwargs)
    embeds, mask, ids, _, _ = _scaled_inputs(
        self, input_ids, kwargs.pop("attention_mask", None), pixel_values, None, scale, True, vision_options
    )
    out = cls_generate(self, *args, input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    # Report the caller's prompt (one placeholder run per image at full scale), then the new tokens.
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    full = torch.cat([input_ids, sequences[:, ids.shape[1] :]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
