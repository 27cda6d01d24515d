"""The Matryoshka objective: mean over scales of each scale's token-mean next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    for gradient accumulation). Returns ``(mean over groups, per-group losses)``; both keep the graph.
    """
    if target_group.numel() and int(target_group.max()) >= num_groups:
        raise ValueError(f"target_group holds {int(target_group.max())} but num_groups is {num_groups}")
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    shared = target_group < 0
    own = target_group.clamp(min=0)
    sums = ce.new_zeros(num_groups).index_add(0, own[~shared], ce[~shared]) + ce[shared].sum()
    if num_items is None:
        counts = torch.bincount(own[~shared], minlength=num_groups) + shared.sum()
        denom = counts.to(ce.dtype)
    else:
        denom = torch.as_tensor(num_items, dtype=ce.dtype, device=ce.device)
    per_group = sums / denom
    return per_group.mean(), per_group
