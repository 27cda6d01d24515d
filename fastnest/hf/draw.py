"""Per-step draws of the token counts a training step runs (MQT's released m, M3's one random scale per step).

A draw is seeded: every process patched with the same seed draws the same counts, step by step (checked across
processes when torch.distributed is initialised), and its generator (``rng``) is saved in checkpoints so that a
resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from ..scales import TokenCounts


class TokenDraw:
    """``k`` distinct counts per step from ``choices``, made into the step's spec by ``make``."""

    def __init__(self, make: Callable[[Sequence[int]], TokenCounts], choices: Sequence[int], k: int, seed: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(choices):
            raise ValueError(
                f"('random', k) needs an int k in 1..{len(choices)} (the counts {choices[0]}..{choices[-1]}), got {k!r}"
            )
        check_same_seed(seed)
        self.make, self.choices, self.k = make, tuple(choices), k
        self.rng = random.Random(seed)

    def __call__(self) -> TokenCounts:
        return self.make(sorted(self.rng.sample(self.choices, self.k)))

    def __repr__(self) -> str:
        return f"TokenDraw(k={self.k}, from {self.choices[0]}..{self.choices[-1]})"


def check_same_seed(seed: int) -> None:
    """With torch.distributed initialised, every process must draw from the same seed: ValueError otherwise."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    bounds = torch.tensor([seed, -seed], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MIN)
    low, high = int(bounds[0]), -int(bounds[1])
    if low != high:
        raise ValueError(
            f"seed differs across processes (from {low} to {high}; this one {seed}): the per-step token counts "
            "would differ; pass the same seed on every process"
        )
