"""The loss alone: fused linear cross-entropy vs. full logits + cross-entropy (bench/loss_workload.py).

Run: ``python -m pytest bench/test_loss.py --benchmark-only -s`` (about a minute on 2 CPU threads). Each
(variant, vocabulary) takes ONE measured step in its own fresh process: its peak added resident memory and
its time (a large vocabulary's unfused step takes ~20 s here). The ratios are printed at the end of the run.
"""

from __future__ import annotations

import math

import pytest

from bench.conftest import LOSS_RESULTS
from bench.loss_workload import LOSS_VARIANTS, loss_step
from bench.workload import Worker


@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_loss(benchmark, variant, vocab):
    worker = Worker(loss_step, variant, vocab)
    try:
        measured = {}

        def run() -> None:
            measured["peak_bytes"], measured["seconds"], measured["loss"] = worker.peak_step()

        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        worker.close()
    benchmark.extra_info.update(measured)
    LOSS_RESULTS[(vocab, variant)] = measured
    assert math.isfinite(measured["loss"])
