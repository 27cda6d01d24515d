"""Every scale's answer logits in ONE packed forward: the training step's layout, without the loss.

Vision tower and projector run once per image; every (sample, scale) sequence is packed into one varlen
language-model pass (fastnest's packed attention hook), and ``lm_head`` is applied only at the positions
that predict labelled tokens. Evaluating each scale separately would run the tower and the text once per
scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import plan_matryoshka
from ..attention import VarlenInfo
from ..hf import attention as hf_attention
from ..ops.projector.function import matryoshka_project


@dataclass(frozen=True)
class ScaleLogits:
    """Predictions at every labelled position, for every (row, scale) sequence."""

    logits: torch.Tensor  # [T, vocab] (float32)
    targets: torch.Tensor  # [T]
    row: torch.Tensor  # [T] batch row of each target
    scale_index: torch.Tensor  # [T] index into the model's scales; -1: a text-only row (the same at every scale)


def _vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Features of the configured layer(s) with CLS dropped, as LLaVA's 'default' strategy: ``[N, grid², Dv]``."""
    config, tower = model.config, model.model.vision_tower
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported")
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    return torch.cat([out.hidden_states[i][:, 1:] for i in layers], dim=-1)


@torch.no_grad()
def multiscale_logits(model, input_ids, attention_mask, labels, pixel_values=None) -> ScaleLogits:
    """Logits of every scale at the labelled positions of a padded processor-style batch (one LM pass)."""
    spec = model._fastnest.spec
    plan = plan_matryoshka(
        input_ids,
        attention_mask,
        labels,
        image_token_id=model.config.image_token_id,
        spec=spec,
        num_images=0 if pixel_values is None else pixel_values.shape[0],
        share_prefix=False,  # one sequence per (row, scale): each scale's answer logits stand on their own
    )
    embed = model.get_input_embeddings()
    device = embed.weight.device
    parts = [embed(input_ids[plan.text_mask.to(input_ids.device)].to(device))]
    if pixel_values is not None:
        visual = matryoshka_project(
            _vision_features(model, pixel_values.to(device)), model.model.multi_modal_projector, spec
        )
        parts.append(visual.reshape(-1, visual.shape[-1]).to(parts[0].dtype))
    source = torch.cat(parts)
    packed = plan.packed.to(device)
    info = VarlenInfo.from_packed(packed, device)
    with hf_attention.packed_forward():
        hidden = model.model.language_model(
            inputs_embeds=source[packed.source_index][None],
            position_ids=packed.position_ids[None],
            use_cache=False,
            **{hf_attention.VARLEN_KWARG: info},
        ).last_hidden_state[0]
    logits = model.lm_head(hidden[packed.logit_index]).float()
    sequence = torch.searchsorted(packed.cu_seqlens.long(), packed.logit_index, right=True) - 1
    rows = torch.tensor(plan.sequence_row, device=device)[sequence]
    return ScaleLogits(logits, packed.targets, rows, packed.target_group)
