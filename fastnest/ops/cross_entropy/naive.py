"""The Matryoshka objective on full logits, the plain reference: mean over scales (loss groups) of each scale's
token-mean next-token cross-entropy; and the group-sum / denominator helpers the fused loss shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...constants import IGNORE_INDEX


def grouped_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    target_group: torch.Tensor,
    num_groups: int,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per loss group, accumulated in fp32.

    ``target_group[i]`` in ``[0, num_groups)`` assigns target ``i`` to one group; ``-1`` counts it towards
    every group (a text-only row computed once stands for all scales). Group ``g``'s loss is the sum of its
    targets' CE divided by its target count (or by ``num_items``, as Hugging Face's ``num_items_in_batch``
    for gradient accumulation). Targets equal to -100 are ignored: they add to no sum and no count (a group
    left with no target has loss 0/0 = NaN, as the mean of nothing). Returns ``(mean over groups, per-group
    losses)``; both keep the graph.
    """
    if target_group.numel() and int(target_group.max()) >= num_groups:
        raise ValueError(f"target_group holds {int(target_group.max())} but num_groups is {num_groups}")
    ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    per_group = group_sums(ce, target_group, num_groups) / denominators(targets, target_group, num_groups, num_items)
    return per_group.mean(), per_group


def group_sums(values: torch.Tensor, target_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[num_groups]``: each group's sum of ``values``, group -1 entries added to every group (no host sync)."""
    shared = target_group < 0
    own = values.new_zeros(num_groups).index_add(0, target_group.clamp(min=0), values.masked_fill(shared, 0))
    return own + values.masked_fill(~shared, 0).sum()


def denominators(
    targets: torch.Tensor, target_group: torch.Tensor, num_groups: int, num_items: int | torch.Tensor | None
) -> torch.Tensor:
    """fp32 ``[num_groups]``: each group's count of non-ignored targets, or ``num_items`` for every group."""
    if isinstance(num_items, torch.Tensor):
        return num_items.to(targets.device, torch.float32, non_blocking=True).expand(num_groups)
    if num_items is not None:  # filled on the device: no blocking host-to-device copy of a Python number
        return torch.full((num_groups,), float(num_items), dtype=torch.float32, device=targets.device)
    return group_sums((targets != IGNORE_INDEX).float(), target_group, num_groups)
