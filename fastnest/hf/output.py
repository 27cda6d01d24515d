"""The output of a patched model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast


@dataclass
class MatryoshkaCausalLMOutput(LlavaCausalLMOutputWithPast):
    """LLaVA output plus ``scale_losses`` (training: detached per-scale losses in ``scales`` order; ``scales``:
    the token counts that step trained),
    ``lm_tokens`` (training: tokens the packed language-model pass ran) and ``attention_mask`` (inference with
    images: the mask of the shortened sequence the model saw).

    The training step returns no ``logits``: its loss is computed from the hidden states in chunks, and no
    logits tensor ever exists in full."""

    scale_losses: torch.Tensor | None = None
    scales: tuple[int, ...] | None = None
    lm_tokens: int | None = None
    attention_mask: torch.Tensor | None = None
