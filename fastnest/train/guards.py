"""The non-finite guard: a step whose loss or gradient norm is NaN/inf never updates the weights, and a
checkpoint is never written from non-finite weights.

Every process decides from the same reduced numbers (the loss summed over processes, the global gradient
norm), so all of them skip or stop together.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss, gradient norm or weight; the message says where and what is kept."""


def grad_norm(trainable: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """The global gradient norm as a device tensor (None without gradients), the gradients clipped to
    ``max_norm`` when it is > 0. No host sync: a non-finite norm leaves non-finite gradients, and that step is
    not applied (the caller reads the norm with the step's other numbers)."""
    grads = [p.grad for p in trainable if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads)  # what clip_grad_norm_ computes, so clipping is unchanged
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(trainable, max_norm, total)
    return total.full_tensor() if hasattr(total, "full_tensor") else total  # a DTensor under FSDP2


class NonFiniteGuard:
    """Counts non-finite steps in a row: ``check`` says whether to apply the update, or raises past the limit."""

    def __init__(self, max_skips: int) -> None:
        self.max_skips, self.in_a_row = max_skips, 0

    def check(self, step: int, loss: float, norm: float, last_checkpoint: str | None) -> bool:
        """True: apply this update. False: skip it (non-finite, within ``max_skips`` in a row)."""
        if math.isfinite(loss) and math.isfinite(norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row <= self.max_skips:
            return False
        kept = f"the last finite checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise NonFiniteError(
            f"step {step}: loss {loss}, gradient norm {norm} (not finite"
            f"{f', {self.in_a_row} steps in a row' if self.in_a_row > 1 else ''}); training stopped before "
            f"applying it, {kept}. Lower --lr (or raise --max-nonfinite-skips to skip such steps)"
        )


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters with a NaN or inf entry (this process's shard under FSDP2)."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad
