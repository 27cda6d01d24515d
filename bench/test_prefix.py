"""Issue 4's shared-prefix target: the all-scale step with each row's system prompt packed once (shared) vs.
once per scale (unshared), per attention backend, on the "prefix" workload (35-token system prompt, image,
~100 text tokens; bench/workload.py).

Run: ``python -m pytest bench/test_prefix.py --benchmark-only -s``. Target: shared >= 5% faster than
unshared, i.e. time ratio shared / unshared <= 0.95. sdpa runs on CPU, on ONE thread: on a shared 2-core
machine, OpenMP's spin-waiting between two threads stretches steps by several times, at random, which
swamps a 5% difference; flash, xformers and flex run on CUDA in bfloat16 and are skipped without it (or
without their package).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from bench.conftest import PREFIX_RESULTS
from bench.workload import ATTENTIONS, StepWorker
from fastnest.dispatch import check_backend

SHARES = ("shared", "unshared")
PAIRS = 10
THREADS = 1


def _unavailable(attention: str) -> str | None:
    if attention == "sdpa":
        return None
    if not torch.cuda.is_available():
        return f"{attention} runs on CUDA"
    try:
        check_backend("attention", attention)
    except ValueError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def started():
    """Per attention backend: its shared and unshared workers and their peak step memory (cold heap)."""
    pairs: dict[str, tuple[dict, dict]] = {}
    yield pairs
    for workers, _ in pairs.values():
        for w in workers.values():
            w.close()


def _pair(started, attention):
    reason = _unavailable(attention)
    if reason is not None:
        pytest.skip(reason)
    if attention not in started:
        workers = {s: StepWorker(f"fastnest/{attention}/{s}", threads=THREADS, workload="prefix") for s in SHARES}
        started[attention] = (workers, {s: w.peak_memory() for s, w in workers.items()})
    return started[attention]


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_prefix_step(benchmark, started, attention, share):
    workers, peaks = _pair(started, attention)
    loss = benchmark.pedantic(workers[share].step, rounds=8, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(peak_bytes=peaks[share], loss=loss)
    PREFIX_RESULTS[f"{attention}/{share}"] = {
        "median_s": stats.median,
        "min_s": stats.min,
        "peak_bytes": peaks[share],
        "loss": loss,
    }
    assert math.isfinite(loss)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_prefix_pairs(benchmark, started, attention):
    """Shared and unshared steps alternated, so the machine's drift cancels in their ratio; wall and CPU time
    both (the CPU time of a worker is what the step costs, whatever else the machine runs)."""
    workers, _ = _pair(started, attention)
    wall, cpu = [], []

    def pair() -> None:
        _, shared_wall, shared_cpu = workers["shared"].timed_step()
        _, unshared_wall, unshared_cpu = workers["unshared"].timed_step()
        wall.append(shared_wall / unshared_wall)
        cpu.append(shared_cpu / unshared_cpu)

    benchmark.pedantic(pair, rounds=PAIRS, iterations=1, warmup_rounds=0)
    PREFIX_RESULTS[f"{attention}/paired"] = {
        "shared/unshared": statistics.median(wall),
        "cpu shared/unshared": statistics.median(cpu),
        "pairs": len(wall),
    }
    benchmark.extra_info.update(wall_ratios=wall, cpu_ratios=cpu)
