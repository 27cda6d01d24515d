"""The per-chunk softmax / loss / d-logits step of the fused linear cross-entropy in plain PyTorch."""

from __future__ import annotations

import torch

from ...constants import IGNORE_INDEX


def ce_grad_(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, loss: torch.Tensor) -> None:
    """PyTorch twin of the Triton and native ``ce_grad_``: per-row CE into ``loss`` (fp32) and
    ``logits <- coef * (softmax - onehot(target))`` in place; ignored rows get 0 and 0."""
    z = logits.float()  # logits itself when fp32, else one fp32 copy of the chunk
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(z, dim=1)
    loss.copy_(torch.where(valid, lse - z.gather(1, safe)[:, 0], 0.0))
    z.sub_(lse[:, None]).exp_()
    z.scatter_add_(1, safe, -valid[:, None].float())
    z.mul_(torch.where(valid, coef, 0.0)[:, None])
    if z is not logits:
        logits.copy_(z)
