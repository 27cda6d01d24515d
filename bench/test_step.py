"""One training step: fastnest's all-scale step vs. the released loop vs. vanilla single-scale HF.

Run: ``python -m pytest bench/ --benchmark-only -s``. Each variant runs in its own process on 2 CPU threads
(bench/workload.py: StepWorker); the ratios are printed at the end of the run.
"""

from __future__ import annotations

import math

import pytest

from bench.conftest import RESULTS
from bench.workload import VARIANTS, StepWorker


@pytest.mark.parametrize("variant", VARIANTS)
def test_step(benchmark, variant):
    worker = StepWorker(variant)
    try:
        peak = worker.peak_memory()
        rounds = 3 if variant == "released_loop" else 8  # the loop is ~8x slower and far from its target
        loss = benchmark.pedantic(worker.step, rounds=rounds, iterations=1, warmup_rounds=1)
    finally:
        worker.close()
    benchmark.extra_info.update(peak_bytes=peak, loss=loss)
    stats = benchmark.stats.stats
    RESULTS[variant] = {"median_s": stats.median, "min_s": stats.min, "peak_bytes": peak, "loss": loss}
    assert math.isfinite(loss)
