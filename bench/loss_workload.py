"""The loss alone: answer-only fused linear cross-entropy vs. full logits + cross-entropy.

T = 2048 labelled tokens of hidden size 256 in 5 loss groups (a quarter of them text-only, group -1), fp32
on CPU, forward + backward. ``logits_ce`` is what an unfused step does: ``hidden @ weight.T`` in full, then
``grouped_cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastnest.ops.cross_entropy.function import fused_linear_cross_entropy
from fastnest.ops.cross_entropy.naive import grouped_cross_entropy

LOSS_VARIANTS = ("fused", "logits_ce")
TOKENS, HIDDEN, GROUPS = 2048, 256, 5


def _inputs(tokens: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=g) / HIDDEN**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    groups = torch.randint(-1, GROUPS, (tokens,), generator=g)
    return hidden, weight, targets, groups


def _loss(variant: str, hidden, weight, targets, groups) -> torch.Tensor:
    if variant == "fused":
        return fused_linear_cross_entropy(hidden, weight, targets, groups, GROUPS)[0]
    if variant == "logits_ce":
        return grouped_cross_entropy(hidden @ weight.t(), targets, groups, GROUPS)[0]
    raise ValueError(f"unknown variant {variant!r}; choose from {LOSS_VARIANTS}")


def loss_step(variant: str, vocab: int) -> Callable[[], float]:
    """A closure running forward + backward of ``variant`` at T=2048, Hd=256; returns the loss.

    A tiny warm-up (16 tokens, vocabulary 64) runs first, so one-time initialisation (thread pools, lazy
    imports) stays out of the measured step without warming its heap: at full vocabulary it would pre-fault
    the [V, Hd] gradient buffers and hide them from the measured peak.
    """
    inputs = _inputs(TOKENS, vocab)
    warm = _inputs(16, 64, seed=1)
    _loss(variant, *warm).backward()

    def step() -> float:
        for t in inputs[:2]:
            t.grad = None
        loss = _loss(variant, *inputs)
        loss.backward()
        return float(loss.detach())

    return step
