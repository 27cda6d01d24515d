"""Fitting the router: binary cross-entropy of each scale's correctness, full batch, a fixed seed.

``correct [N, K]`` says which scales answer each sample (``fastnest analyze``'s score). The fit is deterministic
for a seed (the initialisation is drawn from it in a forked RNG, so the caller's RNG is untouched) and takes
seconds on CPU for thousands of samples. ``out_of_fold`` gives every sample a prediction from a router that did
not see it (k folds), which is what a default budget is chosen on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .head import Router


@dataclass(frozen=True)
class FitOptions:
    hidden: int = 64
    steps: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


def fit_router(
    features: torch.Tensor, correct: torch.Tensor, scales: Sequence[int], options: FitOptions | None = None
) -> Router:
    """A router fitted to predict ``correct [N, K]`` (bool) from ``features [N, F]``; K = len(scales)."""
    options = options or FitOptions()
    features, target = features.float(), correct.float()
    if features.dim() != 2 or target.shape != (features.shape[0], len(scales)):
        raise ValueError(
            f"features must be [N, F] and correct [N, {len(scales)}] for scales {tuple(scales)}, got "
            f"{tuple(features.shape)} and {tuple(correct.shape)}"
        )
    if features.shape[0] < 2:
        raise ValueError(f"fitting a router needs at least 2 samples, got {features.shape[0]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        router = Router(scales, features.shape[1], options.hidden)
    router.mean.copy_(features.mean(0))
    router.std.copy_(features.std(0).clamp(min=1e-6))  # a constant feature stays 0 after standardising
    decay = [p for n, p in router.mlp.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in router.mlp.named_parameters() if not n.endswith("weight")]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=options.lr,
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    router.train()
    # Matrices this small run fastest on one thread; on a loaded 2-core machine two threads made the fit 35x
    # slower (55 s against 1.6 s for 2000 samples), so the fit takes one and gives the setting back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(options.steps):
            optim.zero_grad(set_to_none=True)
            loss_fn(router.logits(features), target).backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    return router.eval().requires_grad_(False)


def out_of_fold(
    features: torch.Tensor,
    correct: torch.Tensor,
    scales: Sequence[int],
    options: FitOptions | None = None,
    folds: int = 5,
) -> torch.Tensor:
    """``[N, K]`` probabilities, each sample's from a router fitted on the other folds (a seeded split)."""
    options = options or FitOptions()
    n = features.shape[0]
    if not 2 <= folds <= n // 2:
        raise ValueError(f"folds must be in 2..{n // 2} for {n} samples, got {folds}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed))
    probs = torch.empty(n, len(scales))
    for part in order.tensor_split(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[part] = False
        router = fit_router(features[keep], correct[keep], scales, options)
        with torch.no_grad():
            probs[part] = router.probabilities(features[part])
    return probs
