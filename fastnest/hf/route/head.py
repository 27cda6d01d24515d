"""The scale router's head: per scale, the probability that the scale answers a sample, from its routing features;
and the budget rule that turns those probabilities into a scale.

Features are standardised with the fitting data's mean and standard deviation, then a one-hidden-layer MLP
(GELU) gives one logit per scale; a sigmoid makes each a probability. The decision with ``budget`` b in (0, 1]:
the scale s maximising ``p_s - (1/b - 1) * tokens_s / max tokens``, its probability less a price per token that
falls as b rises (ties to the fewer tokens; b = 1: no price, the most promising scale). A sample pays for a
larger scale only where the probability it gains is worth the tokens, so at a given mean token count the
cheap escalations come first (a 9-token question before a 144-token one). The chosen scale of each sample never
gets smaller as the price falls (if s beats a smaller s' at some price, p_s - p_s' is at least that price times
their token difference, so s beats s' at every lower price): mean tokens are monotone in b by construction.

The rule before it (router format 1: the fewest-token scale with a probability of at least b times the row's
largest) moved every coin-flip question type up at once, near b = 0.5: no operating point between.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Router(nn.Module):
    """``features [N, F]`` -> ``probabilities [N, K]`` for the K ``scales`` (ascending)."""

    def __init__(self, scales: Sequence[int], num_features: int, hidden: int, budget: float = 1.0) -> None:
        super().__init__()
        scales = tuple(int(s) for s in scales)
        if list(scales) != sorted(set(scales)):
            raise ValueError(f"router scales must be distinct and ascending, got {scales}")
        self.scales, self.budget = scales, check_budget(budget)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, len(scales)))

    @property
    def num_features(self) -> int:
        return self.mean.numel()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"router features must be [samples, {self.num_features}], got shape {tuple(features.shape)}"
            )
        x = (features.to(self.mean) - self.mean) / self.std
        return self.mlp(x)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))

    def choose(self, features: torch.Tensor, budget: float | None = None) -> list[int]:
        """Each sample's scale under ``budget`` (default: the router's own, set when it was fitted)."""
        with torch.no_grad():
            return choose(self.probabilities(features), self.scales, self.budget if budget is None else budget)


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(
            f"budget must be a number in (0, 1] (1: the most promising scale, smaller: fewer tokens), got {budget!r}"
        )
    return float(budget)


def choose(probabilities: torch.Tensor, scales: Sequence[int], budget: float) -> list[int]:
    """Per row of ``probabilities [N, K]`` (columns: ``scales`` ascending), the scale maximising its
    probability less ``(1/budget - 1)`` per ``max(scales)`` tokens (module docstring)."""
    budget = check_budget(budget)
    cost = torch.tensor([s / max(scales) for s in scales], dtype=torch.float64, device=probabilities.device)
    score = probabilities.double() - (1 / budget - 1) * cost
    best = score.argmax(dim=1)  # argmax returns the first maximal column: the fewest tokens
    return [scales[int(i)] for i in best]
