"""One training step: fastnest's all-scale step vs. the released loop vs. vanilla single-scale HF.

Run: ``python -m pytest bench/ --benchmark-only -s``. Each variant runs in its own process on 2 CPU threads
(bench/workload.py: StepWorker); the ratios are printed at the end of the run.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest

from bench.conftest import RESULTS
from bench.workload import VARIANTS, StepWorker


@pytest.fixture(scope="module")
def workers():
    """All variants' workers, each with its peak step memory measured first on a cold heap."""
    started = {v: StepWorker(v) for v in VARIANTS}
    peaks = {v: w.peak_memory() for v, w in started.items()}
    yield started, peaks
    for w in started.values():
        w.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_step(benchmark, workers, variant):
    started, peaks = workers
    rounds = 3 if variant == "released_loop" else 8  # the loop is ~8x slower and far from its target
    loss = benchmark.pedantic(started[variant].step, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(peak_bytes=peaks[variant], loss=loss)
    RESULTS[variant] = {"median_s": stats.median, "min_s": stats.min, "peak_bytes": peaks[variant], "loss": loss}
    assert math.isfinite(loss)


def test_step_pair_fastnest_vanilla(benchmark, workers):
    """fastnest and vanilla steps alternated, so the machine's drift between tests cancels in their ratio."""
    started, _ = workers
    ratios = []

    def pair() -> None:
        t0 = time.perf_counter()
        started["fastnest"].step()
        t1 = time.perf_counter()
        started["vanilla"].step()
        ratios.append((t1 - t0) / (time.perf_counter() - t1))

    benchmark.pedantic(pair, rounds=8, iterations=1, warmup_rounds=0)
    RESULTS["paired"] = {"fastnest/vanilla": statistics.median(ratios), "pairs": len(ratios)}
    benchmark.extra_info.update(median_ratio=RESULTS["paired"]["fastnest/vanilla"], ratios=ratios)
