"""Granularity analysis: accuracy of every sample at every scale, per question type, and the oracle.

A scale is a pooled scale (LLaVA, M3) or a token count of a query transformer (MQT-LLaVA: by default the
log-spaced counts 2, 4, 8, 16, 36, 64, 144 below M, then M); the analysis treats both alike.

Scoring (teacher-forced exact match): a sample is correct at a scale when, with the reference conversation
fed in, the model's argmax at every labelled position (each assistant answer token and its end-of-sequence
token) is the reference token. That is exactly "greedy decoding reproduces the answer and stops", without
decoding; it needs only the labelled positions' logits, which ONE packed multi-scale prefill per batch gives
for every scale (``prefill.multiscale_logits``).

Oracle: for each sample, the fewest visual tokens among the scales that answer it correctly. Oracle accuracy
is the fraction answered by some scale; oracle mean tokens averages that choice over all samples. A sample no
scale answers counts at the SMALLEST scale by default, as the M3 authors count it (it is wrong anyway, so the
oracle spends the least on it: their answer in the released repository's issue #2), which makes the mean
comparable with the paper's; ``unanswered="largest"`` counts it at the largest scale instead (what a model
without the oracle would spend on it).

Granularity of a question type: the fewest tokens whose accuracy is within ``GRANULARITY_TOLERANCE`` of the type's
best accuracy over the evaluated scales (the M3 paper's use of the model as a measure of what a data set needs).
The built-in data set knows each type's designed granularity (``data_synthetic.DESIGNED_SCALES``); the report
prints both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf.state import patch_state
from ..scales import TokenCounts
from .data_llava import BadSamples, Batch, Collator
from .prefill import multiscale_logits
from .template import SYSTEM_V1

log = logging.getLogger("fastnest.train")


@dataclass
class Scores:
    scales: tuple[int, ...]
    correct: torch.Tensor  # bool [num_samples, num_scales]
    question_types: list[str]
    prefill_passes: int
    seconds: float


def score_batch(model, batch: Batch, spec: TokenCounts | None = None) -> torch.Tensor:
    """bool ``[rows, scales]``: every labelled token of the row is the argmax at that scale of ``spec``
    (default: the patch's scales)."""
    return answer_scores(model, batch, spec)[0]


def answer_scores(model, batch: Batch, spec: TokenCounts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, loglik)``, both ``[rows, scales]``: ``score_batch``'s score, and the log-likelihood of the
    row's labelled tokens (its answers and their end-of-sequence tokens), from one packed multi-scale prefill."""
    spec = patch_state(model).spec if spec is None else spec
    inputs = {k: v.to(model.device) for k, v in batch.inputs.items()}
    out = multiscale_logits(model, **inputs, spec=spec)
    num_scales = len(spec.scales)
    hit = (out.logits.argmax(-1) == out.targets).long()
    logp = torch.log_softmax(out.logits, dim=-1).gather(1, out.targets[:, None].long())[:, 0].double()
    rows = out.row.long()
    # Targets of scale index -1 (a text-only row, a shared prefix) count at every scale.
    scale = out.scale_index.clamp(min=0)
    shared = out.scale_index < 0
    rows_all = torch.cat([rows[~shared], rows[shared].repeat_interleave(num_scales)])
    scale_all = torch.cat([scale[~shared], torch.arange(num_scales, device=rows.device).repeat(int(shared.sum()))])
    hit_all = torch.cat([hit[~shared], hit[shared].repeat_interleave(num_scales)])
    logp_all = torch.cat([logp[~shared], logp[shared].repeat_interleave(num_scales)])
    flat = rows_all * num_scales + scale_all
    size = batch.size * num_scales
    total = torch.zeros(size, dtype=torch.long, device=rows.device).index_add_(0, flat, torch.ones_like(hit_all))
    good = torch.zeros(size, dtype=torch.long, device=rows.device).index_add_(0, flat, hit_all)
    loglik = torch.zeros(size, dtype=torch.float64, device=rows.device).index_add_(0, flat, logp_all)
    if bool((total == 0).any()):
        where = batch.where[int((total == 0).nonzero()[0]) // num_scales]
        raise ValueError(f"{where}: no labelled answer token to score")
    return (good == total).view(batch.size, num_scales).cpu(), loglik.view(batch.size, num_scales).cpu()


def collated_batches(examples, collate: Collator, batch_size: int, bad: BadSamples) -> Iterator[tuple[int, Batch]]:
    """``(examples read, batch)`` for each ``batch_size`` run of ``examples`` that keeps a usable row."""
    for first in range(0, len(examples), batch_size):
        idx = range(first, min(first + batch_size, len(examples)))
        batch = collate([examples.example(i, bad) for i in idx], bad)
        if batch is not None:
            yield len(idx), batch


@torch.no_grad()
def evaluate(
    model,
    processor,
    examples,
    *,
    batch_size: int,
    max_length: int,
    system: str,
    bad: BadSamples,
    progress=None,
    spec: TokenCounts | None = None,
) -> Scores:
    """Score every example of ``examples`` (``__len__`` + ``example(i, bad)``) at every scale of ``spec``
    (default: the patch's scales)."""
    spec = patch_state(model).spec if spec is None else spec
    collate = Collator(processor, spec.tokens_per_image, max_length, system)
    was_training = model.training
    model.eval()
    start, rows, types, passes = time.perf_counter(), [], [], 0
    try:
        for size, batch in collated_batches(examples, collate, batch_size, bad):
            rows.append(score_batch(model, batch, spec))
            types.extend(batch.question_types)
            passes += 1
            if progress is not None:
                progress(size)
    finally:
        model.train(was_training)
    correct = torch.cat(rows) if rows else torch.zeros(0, len(spec.scales), dtype=torch.bool)
    return Scores(spec.scales, correct, types, passes, time.perf_counter() - start)


ORACLE_UNANSWERED = ("smallest", "largest")  # where the oracle counts a sample no scale answers
GRANULARITY_TOLERANCE = 0.02  # accuracy (2 points) a scale may lose against the best and still count as enough


def granularity(accuracy: dict[str, float]) -> int | None:
    """The fewest tokens whose accuracy is within ``GRANULARITY_TOLERANCE`` of the best (None: no scales)."""
    if not accuracy:
        return None
    best = max(accuracy.values())
    return min(int(s) for s, a in accuracy.items() if a >= best - GRANULARITY_TOLERANCE - 1e-12)


def _group(correct: torch.Tensor, scales: tuple[int, ...], unanswered: str) -> dict:
    n = correct.shape[0]
    order = sorted(range(len(scales)), key=lambda i: scales[i])  # fewest tokens first
    answered = correct.any(dim=1)
    fallback = min(scales) if unanswered == "smallest" else max(scales)
    tokens = []
    for row in correct.tolist():
        tokens.append(next((scales[i] for i in order if row[i]), fallback))
    accuracy = {str(s): int(correct[:, i].sum()) / n if n else 0.0 for i, s in enumerate(scales)}
    return {
        "n": n,
        "accuracy": accuracy,
        "granularity": granularity(accuracy),
        "oracle_accuracy": int(answered.sum()) / n if n else 0.0,
        "oracle_mean_tokens": sum(tokens) / n if n else 0.0,
    }


def summarize(
    scores: Scores,
    type_order: Iterable[str] = (),
    unanswered: str = "smallest",
    designed: dict | None = None,
    scale_unit: str = "visual tokens",
) -> dict:
    """Accuracy per scale per question type, an ``all`` row, each type's granularity and the oracle (see the
    module docstring; ``unanswered``: the scale, ``"smallest"`` or ``"largest"``, at which it counts a sample no
    scale answers; ``designed``: question type -> its designed granularity, reported beside the measured one;
    ``scale_unit``: what a scale counts, the report's axis: ``"visual tokens per crop"`` for an anyres model)."""
    if unanswered not in ORACLE_UNANSWERED:
        raise ValueError(f"unanswered must be one of {ORACLE_UNANSWERED}, got {unanswered!r}")
    seen = list(dict.fromkeys([*[t for t in type_order if t in scores.question_types], *scores.question_types]))
    groups = {}
    for t in seen:
        mask = torch.tensor([q == t for q in scores.question_types], dtype=torch.bool)
        groups[t] = _group(scores.correct[mask], scores.scales, unanswered)
        if designed and t in designed:
            groups[t]["designed_granularity"] = designed[t]
    overall = _group(scores.correct, scores.scales, unanswered)
    best = max(scores.scales, key=lambda s: overall["accuracy"][str(s)]) if scores.scales else None
    return {
        "scales": list(scores.scales),
        "scale_unit": scale_unit,
        "num_samples": scores.correct.shape[0],
        "scoring": "teacher-forced exact match of every assistant answer token and its end-of-sequence token "
        "(= greedy decoding reproduces the answer)",
        "oracle_definition": "per sample, the fewest tokens among the scales answering it; samples no scale answers "
        + (
            "count at the smallest scale (the M3 authors' definition)"
            if unanswered == "smallest"
            else "count at the largest scale"
        ),
        "oracle_unanswered": unanswered,
        "types": groups,
        "all": overall,
        "best_single_scale": best,
        "prefill_passes": scores.prefill_passes,
        "seconds": scores.seconds,
    }


def analyze_model(
    model_dir: str | Path,
    examples,
    *,
    batch_size: int,
    max_length: int | None,
    bad: BadSamples,
    type_order: Iterable[str] = (),
    device: str | torch.device = "cpu",
    scales: tuple[int, ...] | None = None,
    progress=None,
    unanswered: str = "smallest",
    designed: dict | None = None,
) -> dict:
    """Load a run's model (patched with the given scales, else its saved ones, else the defaults; an MQT-LLaVA
    with the given token counts, else the log-spaced ones up to M) and summarise it on ``examples``. ``designed``
    granularities are pooled scales: an MQT-LLaVA's token counts are reported without them."""
    from .model import connector_of, load_patched, read_settings

    settings = read_settings(model_dir)
    model, processor = load_patched(model_dir, scales)
    model.to(device)
    spec = patch_state(model).training_spec()  # load_patched fixes them: the scales, or the counts, to evaluate
    scores = evaluate(
        model,
        processor,
        examples,
        batch_size=batch_size,
        max_length=max_length or settings.get("max_length", 4096),
        system=settings.get("system", SYSTEM_V1),
        bad=bad,
        progress=progress,
        spec=spec,
    )
    designed = designed if connector_of(model) == "pooled" else None
    return summarize(scores, type_order, unanswered, designed, patch_state(model).adapter.scale_unit)
