"""The scale router's head: per scale, the probability that the scale answers a sample, from its routing features;
and the budget rule that turns those probabilities into a scale.

Features are standardised with the fitting data's mean and standard deviation, then a one-hidden-layer MLP
(GELU) gives one logit per scale; a sigmoid makes each a probability. The decision with ``budget`` b in (0, 1]:
the fewest-token scale whose probability is at least b times the largest of the sample's probabilities. The
threshold b·max rises with b, so the eligible scales only shrink and the choice never gets smaller: mean
tokens are monotone in b by construction (b = 1: the most promising scale, ties to the fewer tokens).
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
    """Per row of ``probabilities [N, K]`` (columns: ``scales`` ascending), the first scale whose probability is
    at least ``budget`` times the row's largest."""
    budget = check_budget(budget)
    eligible = probabilities >= budget * probabilities.max(dim=1, keepdim=True).values
    first = eligible.float().argmax(dim=1)  # argmax returns the first maximal column: the fewest tokens
    return [scales[int(i)] for i in first]
