"""`fastnest analyze`'s evaluation against the released workflow, on the same model and samples.

Run: ``python -m pytest bench/test_analyze_speed.py --benchmark-only -s`` (CPU, ONE thread, in this process:
on a shared 2-core machine OpenMP's spin-waiting between two threads stretches every small kernel by ~10 ms at
random, and fastnest's per-sequence attention makes many small calls). Workload: the built-in tiny LLaVA
(fastnest.train.model.default_model: 24x24 grid, 2-layer Llama of width 64, the synthetic vocabulary), briefly
trained (``TRAIN_STEPS`` all-scale steps: timing does not depend on the weights, the steps only make the
correctness matrices non-trivial), the built-in evaluation split (400 samples, batch 16, scales
1/9/36/144/576). Variants, alternated round by round (the first round is a warm-up and gives the matrices):
- ``fastnest``: ``fastnest.train.analyze.evaluate``, one packed multi-scale prefill per batch;
- ``fastnest, unshared``: the same on a patch with ``share_prefix=False`` (the analysis before it shared each
  row's text before the image across scales);
- ``fastnest, every query``: the same with the last layer's attention at every query (no tail queries,
  ``VarlenInfo.tail_queries``: the analysis before them);
- ``released``: tools/released_eval.py, one padded pass per scale through the unpatched model, full logits;
  each scale's pass over the data reads and collates the samples again, as the released repository evaluates
  one scale per run;
- ``released, shared batches``: the same passes, each batch collated once and run at every scale (faster than
  the released workflow: a stricter reference).
Target: fastnest <= 0.35x the released workflow's time (median of the rounds' ratios); the ratios against the
shared-batches reference are printed beside it. Both workflows run in one process with freed host memory kept
mapped (``fastnest.host_memory``, what the ``fastnest`` command does), so neither page-faults its temporaries in
again every batch.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from unittest import mock

import pytest
import torch

import fastnest
from bench.conftest import SUMMARIES
from fastnest.attention import VarlenInfo
from fastnest.host_memory import retain_freed_memory
from fastnest.scales import DEFAULT_SCALES
from fastnest.train.analyze import evaluate
from fastnest.train.data_llava import BadSamples, Collator, SyntheticExamples
from fastnest.train.model import default_model_and_processor
from fastnest.train.run_analysis import SYNTHETIC_EVAL_SEED
from fastnest.train.template import SYSTEM_V1
from tools.released_eval import released_evaluate

TARGET = 0.35
SAMPLES, BATCH, MAX_LENGTH = 400, 16, 4096
TRAIN_STEPS, ROUNDS = 60, 3
VARIANTS = ("fastnest", "fastnest, unshared", "fastnest, every query", "released", "released, shared batches")
FASTNEST = VARIANTS[:3]
REFERENCES = VARIANTS[3:]
_RESULTS: dict = {}


def _train(model, processor) -> None:
    """A few all-scale AdamW steps on the synthetic training split (seed 0)."""
    bad, data = BadSamples("fail"), SyntheticExamples(TRAIN_STEPS * 8, seed=0, turns=1)
    collate = Collator(processor, 576, MAX_LENGTH, SYSTEM_V1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = collate([data.example(step * 8 + i, bad) for i in range(8)], bad)
        loss = model(**batch.inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def variants():
    torch.set_num_threads(1)
    retain_freed_memory()
    plain, processor = default_model_and_processor(seed=0)
    fast = fastnest.patch_llava(plain, scales=DEFAULT_SCALES)
    _train(fast, processor)
    plain, _ = default_model_and_processor(seed=0)
    plain.load_state_dict(fast.state_dict())
    plain.eval()
    unshared = fastnest.patch_llava(copy.deepcopy(plain), scales=DEFAULT_SCALES, share_prefix=False).eval()
    examples = SyntheticExamples(SAMPLES, seed=SYNTHETIC_EVAL_SEED, turns=1)
    options = dict(batch_size=BATCH, max_length=MAX_LENGTH, system=SYSTEM_V1, bad=BadSamples("fail"))

    def every_query():
        with _no_tail_queries():
            return evaluate(fast, processor, examples, **options).correct

    return {
        "fastnest": lambda: evaluate(fast, processor, examples, **options).correct,
        "fastnest, unshared": lambda: evaluate(unshared, processor, examples, **options).correct,
        "fastnest, every query": every_query,
        "released": lambda: released_evaluate(plain, processor, examples, **options, scales=DEFAULT_SCALES),
        "released, shared batches": lambda: released_evaluate(
            plain, processor, examples, **options, scales=DEFAULT_SCALES, shared_batches=True
        ),
    }


def _no_tail_queries() -> contextlib.AbstractContextManager:
    return mock.patch.object(VarlenInfo, "supports_tail_queries", property(lambda self: False))


def _rounds(variants) -> dict:
    times = {name: [] for name in VARIANTS}
    matrices = {name: fn() for name, fn in variants.items()}  # the warm-up round
    for _ in range(ROUNDS):
        for name in VARIANTS:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratio": {
            ref: {name: statistics.median(a / b for a, b in zip(times[name], times[ref])) for name in FASTNEST}
            for ref in REFERENCES
        },
        "same": {name: torch.equal(matrices[name], matrices["released"]) for name in VARIANTS if name != "released"},
        "correct": {name: int(m.sum()) for name, m in matrices.items()},
        "entries": matrices["released"].numel(),
    }


def test_analyze_speed(benchmark, variants):
    result = benchmark.pedantic(lambda: _rounds(variants), rounds=1, iterations=1)
    _RESULTS.update(result)
    benchmark.extra_info.update(result)
    assert result["seconds"]["fastnest"] > 0


def _summary() -> list[str]:
    if not _RESULTS:
        return []
    r = _RESULTS
    lines = [
        "",
        f"analysis of {SAMPLES} samples x scales {DEFAULT_SCALES}, batch {BATCH}, {torch.get_num_threads()} thread "
        f"(medians of {ROUNDS} alternated rounds; ratios = variant / reference, per round):",
        f"  {'variant':<26}{'seconds':>9}{'/ released':>12}{'/ shared':>10}{'same matrix':>13}{'correct entries':>17}",
    ]
    for name in VARIANTS:
        ratios = [f"{r['ratio'][ref][name]:.2f}x" if name in FASTNEST else "" for ref in REFERENCES]
        same = ("yes" if r["same"][name] else "NO") if name in r["same"] else ""
        correct = f"{r['correct'][name]} / {r['entries']}"
        lines.append(f"  {name:<26}{r['seconds'][name]:>9.2f}{ratios[0]:>12}{ratios[1]:>10}{same:>13}{correct:>17}")
    for ref in REFERENCES:
        ratio = r["ratio"][ref]["fastnest"]
        verdict = "met" if ratio <= TARGET else "NOT met"
        lines.append(f"  target fastnest <= {TARGET}x {ref}: {ratio:.2f}x, {verdict}")
    return lines


SUMMARIES.append(_summary)
