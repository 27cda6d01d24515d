"""Peak memory of one all-scale training step: fastnest vs. the released loop, at vocab 32000 and 128256.

Run: ``python -m pytest bench/test_step_memory.py --benchmark-only -s``. Each (variant, vocab) runs in a fresh
process (bench/workload.py: StepWorker) and measures its first step on a cold heap: the resident memory the step
adds at its peak, and its time. Same workload as bench/test_step.py. Target: fastnest <= 0.3x the released
loop's peak memory at vocab 32000.
"""

from __future__ import annotations

import pytest

from bench.conftest import SUMMARIES
from bench.workload import StepWorker

VOCABS = (32000, 128256)
TARGET = 0.3
_PEAKS: dict[tuple[int, str], tuple[int, float, float]] = {}


def _summary() -> list[str]:
    lines = []
    for vocab in VOCABS:
        fast, loop = _PEAKS.get((vocab, "fastnest")), _PEAKS.get((vocab, "released_loop"))
        if not (fast and loop):
            continue
        ratio = fast[0] / loop[0]
        verdict = f"  <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}" if vocab == 32000 else ""
        lines.append(
            f"  vocab {vocab:>6}: fastnest {fast[0] / 2**20:>6.0f} MiB {fast[1]:>6.1f} s | released loop "
            f"{loop[0] / 2**20:>6.0f} MiB {loop[1]:>6.1f} s | memory {ratio:.2f}x, time {fast[1] / loop[1]:.2f}x"
            f"{verdict}; same loss: {'yes' if abs(fast[2] - loop[2]) <= 1e-5 * abs(loop[2]) else 'NO'}"
        )
    return ["", "peak memory of one step on a cold heap (ratio = fastnest / released loop):", *lines] if lines else []


SUMMARIES.append(_summary)


@pytest.mark.parametrize("variant", ["fastnest", "released_loop"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_step_memory(benchmark, vocab: int, variant: str):
    worker = StepWorker(variant, vocab=vocab)
    try:
        _PEAKS[(vocab, variant)] = benchmark.pedantic(worker.peak_step, rounds=1, iterations=1)
    finally:
        worker.close()
