"""The output of a patched model's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast


@dataclass
class MatryoshkaCausalLMOutput(LlavaCausalLMOutputWithPast):
    """The training step's output: LLaVA's plus ``scale_losses`` (detached per-scale losses in ``scales`` order;
    ``scales``: the token counts that step trained) and ``lm_tokens`` (tokens the packed language-model pass
    ran). Inference returns Hugging Face's own output (``fastnest.scaled_inputs`` gives the shortened batch).

    The training step returns no ``logits``: its loss is computed from the hidden states in chunks, and no
    logits tensor ever exists in full."""

    scale_losses: torch.Tensor | None = None
    scales: tuple[int, ...] | None = None
    lm_tokens: int | None = None
