"""The cost of a routed answer against the fixed largest-scale answer, measured side by side.

For the first held-out prompts, in batches: ``generate(scale="auto")`` (the routing pass at the smallest scale,
then the chosen scales' pass) and ``generate(scale=largest)``, greedy, the same ``max_new_tokens``; each
measured ``repeats`` times, alternating which goes first, after one untimed warm-up of each; the median per
batch, summed. Also timed alone: the routing pass (``fastnest.route_scales``). Tokens are counted from the
inputs each pass hands the language model (``fastnest.scaled_inputs``) plus the tokens it generated (the
non-padding ones after the prompt: the pad id must not be a token the model writes).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..hf.inference import scaled_inputs
from ..hf.route import attached_router, route_scales
from .data_llava import BadSamples, Collator
from .route_data import prompts


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _one_batch(model, prompt: dict, budget, options: dict, repeats: int, totals: dict, counts: dict) -> None:
    """Time and count one batch of prompts into ``totals`` and ``counts``."""
    router = attached_router(model)
    smallest, largest = router.scales[0], router.scales[-1]
    width = prompt["input_ids"].shape[1]
    runs = {
        "fixed_s": lambda: model.generate(**prompt, scale=largest, **options),
        "routed_s": lambda: model.generate(**prompt, scale="auto", budget=budget, **options),
    }
    for run in runs.values():  # warm-up
        run()
    times, outs = {"fixed_s": [], "routed_s": [], "routing_s": []}, {}
    for r in range(repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            seconds, outs[name] = _timed(runs[name])
            times[name].append(seconds)
        times["routing_s"].append(_timed(lambda: route_scales(model, **prompt, budget=budget))[0])
    for name, values in times.items():
        totals[name] += statistics.median(values)
    for name, key in (("fixed_s", "fixed_new"), ("routed_s", "routed_new")):
        counts[key] += int((outs[name][:, width:] != options["pad_token_id"]).sum())
    chosen = route_scales(model, **prompt, budget=budget)
    counts["fixed_visual"] += largest * len(chosen)
    counts["routed_visual"] += smallest * len(chosen) + sum(chosen)
    for key, scale in (("fixed_prompt", largest), ("routing_prompt", smallest), ("chosen_prompt", chosen)):
        counts[key] += int(scaled_inputs(model, **prompt, scale=scale)["attention_mask"].sum())


@torch.no_grad()
def measure(
    model,
    processor,
    examples,
    *,
    budget: float | None,
    samples: int,
    batch_size: int,
    max_new_tokens: int,
    repeats: int,
    max_length: int,
    system: str,
    bad: BadSamples,
) -> dict:
    router = attached_router(model)
    largest = router.scales[-1]
    tok = processor.tokenizer
    options = {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
    }
    collate = Collator(processor, largest, max_length, system)
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(("fixed_s", "routed_s", "routing_s"), 0.0)
    counts = dict.fromkeys(
        ("answers", "fixed_visual", "routed_visual", "fixed_prompt", "routing_prompt", "chosen_prompt"), 0
    ) | {"fixed_new": 0, "routed_new": 0}
    try:
        for first in range(0, min(samples, len(examples)), batch_size):
            idx = range(first, min(first + batch_size, samples, len(examples)))
            batch = collate([examples.example(i, bad) for i in idx], bad)
            if batch is None:
                continue
            prompt = {k: v.to(model.device) for k, v in prompts(batch.inputs, options["pad_token_id"])[0].items()}
            _one_batch(model, prompt, budget, options, repeats, totals, counts)
            counts["answers"] += len(idx)
    finally:
        model.train(was_training)
    n = counts["answers"]
    if n == 0:
        raise ValueError("no held-out row could be timed")
    per = lambda k: counts[k] / n  # noqa: E731
    return {
        "answers": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "max_new_tokens": max_new_tokens,
        "budget": router.budget if budget is None else budget,
        "largest": largest,
        "smallest": router.scales[0],
        "per_answer": {
            "fixed": {"visual_tokens": per("fixed_visual"), "lm_tokens": per("fixed_prompt") + per("fixed_new")},
            "routed": {
                "visual_tokens": per("routed_visual"),
                "lm_tokens": per("routing_prompt") + per("chosen_prompt") + per("routed_new"),
                "routing_pass_lm_tokens": per("routing_prompt"),
            },
            "fixed_ms": 1000 * totals["fixed_s"] / n,
            "routed_ms": 1000 * totals["routed_s"] / n,
            "routing_pass_ms": 1000 * totals["routing_s"] / n,
        },
        "time_ratio": totals["routed_s"] / totals["fixed_s"],
    }
