"""Accuracy against mean visual tokens: fixed scales, the oracle, a training-free cascade, the router; and the two
figures that compare them.

Every figure counts the visual tokens of every pass a method runs (per image): a fixed scale its scale, the
cascade the sum of the scales it tried, the router its routing pass (the smallest scale) plus the scale it
chose, the oracle the fewest tokens that answer the sample (a sample no scale answers: the smallest, the M3
authors' count).

Fixed-scale frontier at t tokens: the best accuracy of a fixed scale with at most t tokens (its running
maximum over scales), interpolated linearly in log tokens between consecutive scales; it is what the plot's
log axis draws, and it lies above mixing two scales at random (linear in tokens), so it is the harder bar.
Gap closed at a point (t, a): (a - frontier(t)) / (oracle accuracy - frontier(t)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .head import choose

# Budgets and cascade thresholds swept in the reports: fine where the curves bend (a budget b prices tokens at
# 1/b - 1 per max(scales): the small budgets spread the escalations of the small scales).
BUDGETS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)


def fixed_points(correct: torch.Tensor, scales: Sequence[int]) -> list[tuple[float, float]]:
    """(tokens, accuracy) of each fixed scale."""
    return [(float(s), float(correct[:, k].float().mean())) for k, s in enumerate(scales)]


def oracle_point(correct: torch.Tensor, scales: Sequence[int]) -> tuple[float, float]:
    """(mean tokens, accuracy) of the per-sample oracle."""
    answered = correct.any(dim=1)
    first = correct.float().argmax(dim=1)  # the first correct column: the fewest tokens (scales ascending)
    tokens = torch.tensor([float(s) for s in scales])[first]
    tokens[~answered] = float(min(scales))
    return float(tokens.mean()), float(answered.float().mean())


def frontier(points: Sequence[tuple[float, float]], tokens: float) -> float:
    """The fixed-scale frontier (module docstring) at ``tokens``."""
    ordered = sorted(points)
    best, envelope = -1.0, []
    for t, a in ordered:
        best = max(best, a)
        envelope.append((t, best))
    if tokens <= envelope[0][0]:
        return envelope[0][1]
    for (t0, a0), (t1, a1) in zip(envelope, envelope[1:]):
        if tokens <= t1:
            w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return a0 + w * (a1 - a0)
    return envelope[-1][1]


def gap_closed(
    point: tuple[float, float], fixed: Sequence[tuple[float, float]], oracle_accuracy: float
) -> float | None:
    """The share of the frontier-to-oracle gap a (tokens, accuracy) point closes; None when the oracle is not
    above the frontier there."""
    tokens, accuracy = point
    base = frontier(fixed, tokens)
    if oracle_accuracy <= base:
        return None
    return (accuracy - base) / (oracle_accuracy - base)


def router_point(
    probabilities: torch.Tensor, correct: torch.Tensor, scales: Sequence[int], budget: float
) -> tuple[float, float, list[int]]:
    """(mean tokens with the routing pass, accuracy, chosen scales) of routing by ``probabilities`` at ``budget``."""
    chosen = choose(probabilities, scales, budget)
    column = torch.tensor([scales.index(s) for s in chosen])
    accuracy = float(correct[torch.arange(len(chosen)), column].float().mean())
    return min(scales) + sum(chosen) / len(chosen), accuracy, chosen


def cascade_point(
    confidence: torch.Tensor, correct: torch.Tensor, scales: Sequence[int], threshold: float
) -> tuple[float, float]:
    """(mean tokens over every pass run, accuracy) of the cascade: start at the smallest scale, move to the next
    while the greedy answer's confidence there is below ``threshold``; the largest scale answers in the end."""
    spent, hits = 0.0, 0
    for conf, ok in zip(confidence.tolist(), correct.tolist()):
        k = 0
        spent += scales[0]
        while conf[k] < threshold and k < len(scales) - 1:
            k += 1
            spent += scales[k]
        hits += bool(ok[k])
    n = len(correct)
    return spent / n, hits / n


def best_budget(
    probabilities: torch.Tensor, correct: torch.Tensor, scales: Sequence[int], budgets: Sequence[float] = BUDGETS
) -> float:
    """The budget whose routing closes most of the frontier-to-oracle gap on these samples (ties: the smaller
    budget, fewer tokens); 1.0 when the oracle is nowhere above the frontier."""
    fixed = fixed_points(correct, scales)
    _, oracle = oracle_point(correct, scales)
    best, chosen = -math.inf, 1.0
    for b in budgets:
        tokens, accuracy, _ = router_point(probabilities, correct, scales, b)
        share = gap_closed((tokens, accuracy), fixed, oracle)
        if share is not None and share > best:
            best, chosen = share, b
    return chosen
