"""The ONE packed multi-scale pass that training and the analysis share.

Vision tower and connector once per image -> each image's layout -> the plan over every (row, scale) ->
one varlen language-model pass over the packed sequence -> the final hidden states at the positions that
predict a label. What a model family contributes (embedding, visual rows, the language model's call) comes
through :class:`StepModel`, so this file knows no Hugging Face type. The attention backend is resolved here,
once per step, for both users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.profiler import record_function

from .attention import VarlenInfo
from .dispatch import resolve_backend
from .layout import ImageLayout
from .ops.cross_entropy.function import fused_linear_cross_entropy
from .packing import PackedSequences
from .plan import MatryoshkaPlan, plan_matryoshka


class StepModel(Protocol):
    """What the packed pass needs from a model (an adapter bound to one patched model and call)."""

    def image_layouts(self, pixel_values: torch.Tensor | None) -> Sequence[ImageLayout]:
        """Each image's layout (cheap: no vision compute)."""

    def visual_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[sum of the images' rows, D]``: every image's rows in image order (vision tower + connector)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[n] -> [n, D]`` token embeddings, on the language model's device."""

    def language_model(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        info: VarlenInfo,
        rows: torch.Tensor,
        tail: tuple[VarlenInfo, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[T, D] -> [R, D]``: the decoder over the packed sequence, its attention by ``info``; the final hidden
        states at the packed positions ``rows`` (the only ones read: a decoder may skip work at the others, e.g.
        run its last layer's attention at ``tail``'s queries, ``info.tail_queries(rows)``, None where the backend
        has none)."""


@dataclass(frozen=True)
class StepOutput:
    """The packed pass's result: ``hidden [num_targets, D]`` predicts ``packed.targets`` (loss group
    ``packed.target_group``: a scale index, or -1 for every scale)."""

    hidden: torch.Tensor
    plan: MatryoshkaPlan
    packed: PackedSequences  # on the hidden states' device
    attention: str  # the backend that ran the packed attention

    @property
    def lm_tokens(self) -> int:
        """Tokens the language model ran (every scale's copy, each shared prefix once)."""
        return self.packed.total


def source_rows(model: StepModel, plan: MatryoshkaPlan, input_ids: torch.Tensor, visual: torch.Tensor | None):
    """The rows the plan indexes: ``[text embeddings; every image's visual rows; one zero row]`` (the zero
    row pads padded layouts). The text tokens are picked on the host, where the plan's mask is (a boolean-mask
    index on a device waits for it); ``embed`` moves them."""
    text = model.embed(input_ids.cpu()[plan.text_mask])
    parts = [text] if visual is None else [text, visual.to(text.device, text.dtype)]
    parts.append(text.new_zeros(1, text.shape[-1]))
    return torch.cat(parts)


def plan_batch(
    model: StepModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    *,
    image_token_id: int,
    share_prefix: bool,
    max_length: int | None = None,
) -> tuple[MatryoshkaPlan, torch.Tensor]:
    """Plan the batch over the images' layouts, then compute its source rows (vision runs once per image)."""
    with record_function("fastnest.plan"):  # a named range for profiles (bench/profile_step.py)
        plan = plan_matryoshka(
            input_ids,
            attention_mask,
            labels,
            image_token_id=image_token_id,
            layouts=model.image_layouts(pixel_values),
            share_prefix=share_prefix,
            max_length=max_length,
        )
    visual = model.visual_rows(pixel_values) if plan.num_images else None
    return plan, source_rows(model, plan, input_ids, visual)


def packed_step(
    model: StepModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    pixel_values: torch.Tensor | None,
    *,
    image_token_id: int,
    attention: str = "auto",
    share_prefix: bool = True,
    max_length: int | None = None,
) -> StepOutput:
    """Every (row, scale) sequence of a padded batch in one packed language-model pass.

    ``attention``: "auto" or a backend name, resolved by ``fastnest.dispatch`` for the source's device and the
    dtype the decoder computes in (the autocast dtype when autocast is on), with a backward when grad is on.
    ``max_length``: each row's tokens kept at each scale (``plan_matryoshka``); None keeps all.
    """
    plan, source = plan_batch(
        model,
        input_ids,
        attention_mask,
        labels,
        pixel_values,
        image_token_id=image_token_id,
        share_prefix=share_prefix,
        max_length=max_length,
    )
    if plan.packed.total == 0:
        raise ValueError(f"the batch holds no tokens (input_ids of shape {tuple(input_ids.shape)}, all padding)")
    device = source.device
    packed = plan.packed.to(device)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else source.dtype
    backend = resolve_backend("attention", device, attention, dtype=dtype, backward=torch.is_grad_enabled())
    info = VarlenInfo.from_packed(packed, device, backend)
    tail = info.tail_queries(plan.packed.logit_index) if info.supports_tail_queries else None
    hidden = model.language_model(source[packed.source_index], packed.position_ids, info, packed.logit_index, tail=tail)
    return StepOutput(hidden=hidden, plan=plan, packed=packed, attention=backend)


def step_loss(
    step: StepOutput,
    head: torch.nn.Module,
    num_scales: int,
    *,
    num_items: int | float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-scale losses)`` of a packed step: each scale's token-mean next-token cross-entropy and their
    mean, from the hidden states at the labelled positions and the output head's weight (and bias) by
    ``fused_linear_cross_entropy`` (never more than one chunk of logits). ``num_items``: the target count to
    divide by instead (gradient accumulation); ``backend``: its kernels (``fastnest.dispatch``).
    """
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"the fastnest training step reads lm_head's weight for its fused loss and needs an nn.Linear, "
            f"got {type(head).__name__}"
        )
    with record_function("fastnest.loss"):
        return fused_linear_cross_entropy(
            step.hidden.to(head.weight.device),
            head.weight,
            step.plan.packed.targets,  # the host copy: checked there without a device sync
            step.plan.packed.target_group,
            num_scales,
            bias=head.bias,
            num_items=num_items,
            backend=backend,
        )
