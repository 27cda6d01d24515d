"""The held-out comparison of ``fastnest route``: every fixed scale, the cascade (a threshold sweep), the router
(a budget sweep), the oracle, per question type at the router's budget, and the two target figures.

Token accounting and the frontier: ``fastnest.hf.route.tradeoff``. The target figures:

- ``token_ratio``: the fewest mean tokens at which a swept budget reaches the best fixed scale's accuracy,
  over that scale's tokens (None: no budget reaches it);
- ``gap_closed``: at the router's own budget (chosen on the routing-train split, out of fold), the share of
  the gap between the fixed-scale frontier at the router's mean tokens and the oracle that it closes; the
  sweep's largest share is reported beside it (chosen on the held-out split itself: an upper bound).
"""

from __future__ import annotations

import torch

from ..hf.route import Router
from ..hf.route.tradeoff import (
    BUDGETS,
    THRESHOLDS,
    cascade_point,
    fixed_points,
    frontier,
    gap_closed,
    oracle_point,
    router_point,
)
from .route_data import RouteData


def _by_type(data: RouteData, chosen: list[int]) -> dict:
    """Per question type: each fixed scale's accuracy, the router's (at its budget) and the oracle's."""
    out = {}
    scales = data.scales
    for qtype in dict.fromkeys(data.question_types):
        rows = torch.tensor([t == qtype for t in data.question_types])
        correct = data.correct[rows]
        picks = [s for s, keep in zip(chosen, rows.tolist()) if keep]
        column = torch.tensor([scales.index(s) for s in picks])
        tokens, accuracy = oracle_point(correct, scales)
        out[qtype] = {
            "n": int(rows.sum()),
            "fixed": {str(s): a for (_, a), s in zip(fixed_points(correct, scales), scales)},
            "router": {
                "accuracy": float(correct[torch.arange(len(picks)), column].float().mean()),
                "tokens": min(scales) + sum(picks) / len(picks),
            },
            "oracle": {"accuracy": accuracy, "tokens": tokens},
        }
    return out


def compare(router: Router, data: RouteData, budgets=BUDGETS, thresholds=THRESHOLDS) -> dict:
    """The comparison on held-out ``data`` (module docstring); the cascade when ``data`` has confidences."""
    if tuple(router.scales) != data.scales:
        raise ValueError(f"router scales {router.scales} differ from the data's {data.scales}")
    scales, correct = data.scales, data.correct
    with torch.no_grad():
        probs = router.probabilities(data.features)
    fixed = fixed_points(correct, scales)
    oracle_tokens, oracle_accuracy = oracle_point(correct, scales)
    best_tokens, best_accuracy = max(fixed, key=lambda p: (p[1], -p[0]))
    sweep = []
    for b in budgets:
        tokens, accuracy, chosen = router_point(probs, correct, scales, b)
        sweep.append(
            {
                "budget": b,
                "tokens": tokens,
                "accuracy": accuracy,
                "frontier": frontier(fixed, tokens),
                "gap_closed": gap_closed((tokens, accuracy), fixed, oracle_accuracy),
                "share": {str(s): chosen.count(s) / len(chosen) for s in scales},
            }
        )
    own_tokens, own_accuracy, own_chosen = router_point(probs, correct, scales, router.budget)
    reaching = [p["tokens"] for p in sweep if p["accuracy"] >= best_accuracy]
    shares = [p for p in sweep if p["gap_closed"] is not None]
    widest = max(shares, key=lambda p: p["gap_closed"]) if shares else None
    result = {
        "num_samples": len(data.where),
        "scales": list(scales),
        "fixed": [{"scale": int(t), "tokens": t, "accuracy": a} for t, a in fixed],
        "oracle": {"tokens": oracle_tokens, "accuracy": oracle_accuracy},
        "router": {
            "budget": router.budget,
            "tokens": own_tokens,
            "accuracy": own_accuracy,
            "frontier": frontier(fixed, own_tokens),
            "gap_closed": gap_closed((own_tokens, own_accuracy), fixed, oracle_accuracy),
            "share": {str(s): own_chosen.count(s) / len(own_chosen) for s in scales},
        },
        "router_sweep": sweep,
        "by_type": _by_type(data, own_chosen),
        "targets": {
            "best_fixed": {"scale": int(best_tokens), "tokens": best_tokens, "accuracy": best_accuracy},
            "router_tokens_at_best_fixed_accuracy": min(reaching) if reaching else None,
            "token_ratio": min(reaching) / best_tokens if reaching else None,
            "gap_closed": gap_closed((own_tokens, own_accuracy), fixed, oracle_accuracy),
            "gap_closed_best_in_sweep": None if widest is None else widest["gap_closed"],
            "gap_closed_best_budget": None if widest is None else widest["budget"],
        },
    }
    t = result["targets"]
    t["token_ratio_met"] = t["token_ratio"] is not None and t["token_ratio"] <= 0.5
    t["gap_closed_met"] = t["gap_closed"] is not None and t["gap_closed"] >= 0.5
    if data.confidence is not None:
        result["cascade"] = [
            dict(zip(("tokens", "accuracy"), cascade_point(data.confidence, correct, scales, th)), threshold=th)
            for th in thresholds
        ]
        result["greedy_agreement"] = float((data.greedy_correct == correct).float().mean())
    return result
