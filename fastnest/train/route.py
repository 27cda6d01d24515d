"""``fastnest route``: fit a model's scale router and compare it, on a held-out split, with every fixed scale, a
training-free cascade and the oracle.

Steps: measure the routing-train split (``route_data.collect``: per-sample, per-scale correctness and answer
log-likelihood from the analysis' packed prefill, routing features from the routing pass); fit the router on
it (``fastnest.hf.route.fit_router``) and choose its default budget on out-of-fold predictions (the budget
closing most of the frontier-to-oracle gap there); save it beside the model (``DIR/router/``); load it back
as ``scale="auto"`` would; measure the held-out split (the same, plus greedy answers at every scale for the
cascade); compare (``route_eval``); time routed answers against fixed largest-scale ones (``route_cost``);
write the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..hf.route import FitOptions, fit_router, load_router, out_of_fold, save_router
from ..hf.route.tradeoff import best_budget, fixed_points
from ..hf.state import patch_state
from . import route_cost, route_report
from .data_llava import BadSamples
from .route_data import RouteData, collect
from .template import SYSTEM_V1


def _scale_summary(data: RouteData) -> dict:
    return {
        "accuracy": {str(s): a for (_, a), s in zip(fixed_points(data.correct, data.scales), data.scales)},
        "mean_answer_loglik": {str(s): float(v) for s, v in zip(data.scales, data.loglik.mean(0))},
    }


def route_model(
    model_dir: str | Path,
    train_examples,
    heldout_examples,
    *,
    out_dir: str | Path,
    splits: str,
    batch_size: int,
    max_length: int | None,
    bad: BadSamples,
    device: str = "cpu",
    scales: tuple[int, ...] | None = None,
    fit: FitOptions | None = None,
    folds: int = 5,
    max_new_tokens: int = 16,
    cost: dict | None = None,
) -> dict:
    """Fit, save and evaluate the router of ``model_dir`` (module docstring); returns the report's content.
    ``cost``: ``route_cost.measure``'s options (samples, batch_size, repeats), None: not timed."""
    from .model import load_patched, read_settings

    fit = fit or FitOptions()
    settings = read_settings(model_dir)
    model, processor = load_patched(model_dir, scales)
    model.to(device)
    spec = patch_state(model).training_spec()
    common = {
        "spec": spec,
        "batch_size": batch_size,
        "max_length": max_length or settings.get("max_length", 4096),
        "system": settings.get("system", SYSTEM_V1),
        "bad": bad,
    }
    train = collect(model, processor, train_examples, **common)
    start = time.perf_counter()
    router = fit_router(train.features, train.correct, train.scales, fit)
    router.budget = best_budget(
        out_of_fold(train.features, train.correct, train.scales, fit, folds), train.correct, train.scales
    )
    fit_seconds = time.perf_counter() - start
    fitting = {
        "data": splits,
        "samples": len(train.where),
        "options": asdict(fit),
        "folds": folds,
        "budget_rule": "out-of-fold budget closing most of the frontier-to-oracle gap on the routing-train split",
        "seconds": fit_seconds,
        "routing_train": _scale_summary(train),
    }
    folder = save_router(router, model_dir, fitting)
    router = load_router(model, model_dir)  # what scale="auto" will use
    heldout = collect(model, processor, heldout_examples, greedy=True, max_new_tokens=max_new_tokens, **common)
    from .route_eval import compare

    result = {
        "model": str(model_dir),
        "splits": splits,
        "router_dir": str(folder),
        "fit": f"{len(train.where)} samples, {fit.steps} full-batch steps, {fit_seconds:.1f} s with {folds}-fold budget choice",
        "collect_seconds": {"routing_train": train.seconds, "heldout": heldout.seconds},
        "heldout_scales": _scale_summary(heldout),
        "comparison": compare(router, heldout),
        "device": str(device),
        "torch": torch.__version__,
    }
    if cost:
        result["cost"] = route_cost.measure(
            model,
            processor,
            heldout_examples,
            budget=None,
            max_new_tokens=max_new_tokens,
            max_length=common["max_length"],
            system=common["system"],
            bad=bad,
            **cost,
        )
    paths = route_report.write(result, out_dir, title=f"Scale router of {model_dir}")
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result
