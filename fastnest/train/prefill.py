"""Every scale's answer logits in ONE packed forward: the training step's packed pass, without the loss.

A scale is a pooled scale or a query transformer's token count (``fastnest.scales.TokenCounts``). Vision tower
and connector run once per image; every (sample, scale) sequence is packed into one varlen
language-model pass (``fastnest.step.packed_step``, the training step's own), and ``lm_head`` is applied only
at the positions that predict labelled tokens. Evaluating each scale separately would run the tower and the
text once per scale. With the patch's ``share_prefix`` (the default) each row's text before its first image,
and an MQT-LLaVA's image tokens up to the largest count, run once for every scale (the same logits: the
training step's sharing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hf.forward import packed_pass
from ..scales import TokenCounts


@dataclass(frozen=True)
class ScaleLogits:
    """Predictions at every labelled position, for every (row, scale) sequence."""

    logits: torch.Tensor  # [T, vocab] (float32)
    targets: torch.Tensor  # [T]
    row: torch.Tensor  # [T] batch row of each target
    scale_index: torch.Tensor  # [T] index into the scales; -1: the same at every scale (a text-only row, or a
    # label in a shared prefix)


@torch.no_grad()
def multiscale_logits(
    model, input_ids, attention_mask, labels, pixel_values=None, spec: TokenCounts | None = None, image_sizes=None
) -> ScaleLogits:
    """Logits of every scale of ``spec`` (default: the patch's) at the labelled positions of a padded
    processor-style batch (one LM pass), with the patch's attention backend and kernels; ``image_sizes``: an
    anyres model's (LLaVA-NeXT) image sizes, as its processor gives them."""
    options = {"image_sizes": image_sizes}  # None: a fixed-size LLaVA's (the packed pass drops it)
    state, step = packed_pass(model, input_ids, attention_mask, labels, pixel_values, vision_options=options, spec=spec)
    packed = step.packed
    logits = state.adapter.lm_head(model)(step.hidden).float()
    sequence = torch.searchsorted(packed.cu_seqlens.long(), packed.logit_index, right=True) - 1
    rows = torch.tensor(step.plan.sequence_row, device=logits.device)[sequence]
    return ScaleLogits(logits, packed.targets, rows, packed.target_group)
