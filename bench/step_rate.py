"""The all-scale step against the machine's GEMM rate, and against the released loop and the vanilla step (issue 19).

Run: ``python -m bench.step_rate [--rounds 5] [--allocator retained|system]`` (2 threads, bench/workload.py's
mixed workload: hidden 256, 4 layers, vocab 32000, batch 4, text 40-400 tokens). Each variant runs in its own
worker process, every one with the same host allocator setting (default: freed memory kept mapped, as in the
fastnest CLI's process; fastnest/host_memory.py says why). First one
step of each under ``bench.flop_count.FlopCount`` (FLOPs by a dispatch hook: GEMMs 2·M·K·N, fused attention
as its causal useful work; the module says how). Then rounds, alternated so the machine's drift cancels in the
ratios: the fastnest step's GEMMs alone (``torch.mm`` at the step's own shapes, layouts and counts, in the
fastnest worker: the GEMM rate), then two back-to-back steps of each variant, the second timed. Per round:
achieved GFLOP/s = the step's FLOPs / its wall time, its share of that round's GEMM rate, and the time ratios;
the medians over rounds and the targets at the end.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator

from bench.workload import UNFUSED, StepWorker

VARIANTS = ("fastnest", UNFUSED, "vanilla", "released_loop")
ALLOCATORS = ("retained", "system")
TARGETS = {"gemm share": (">=", 0.8), "fastnest/released_loop": ("<=", 0.2), "fastnest/vanilla": ("<=", 0.65)}


def _met(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"  target {op} {target}: {'met' if ok else 'NOT met'}"


def _warm_seconds(worker: StepWorker) -> float:
    """Wall seconds of the second of two back-to-back steps. The first one pays for this worker's idle spell:
    the bench VM pages out memory nobody touched for a while (DAMON pageout), and the libraries' code that
    another variant does not run is read back from disk."""
    worker.step()
    return worker.timed_step()[1]


def measure(rounds: int, allocator: str = "retained") -> Iterator[str]:
    """The report's lines, each as soon as it is measured. ``allocator``: "retained", every worker keeps freed
    memory mapped (``fastnest.host_memory``, what the fastnest CLI does), or "system", glibc's defaults."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r} is not one of {ALLOCATORS}")
    workers = {v: StepWorker(v, retain_memory=allocator == "retained") for v in VARIANTS}
    yield f"host allocator: {allocator} (every variant)"
    try:
        for w in workers.values():
            w.step()  # warm-up
        counts = {v: w.count_flops() for v, w in workers.items()}
        yield "FLOPs per step (GEMMs by dispatch hook + fused attention, causal useful work):"
        for v, (gemm, attention, calls) in counts.items():
            yield (
                f"  {v:<17} {(gemm + attention) / 1e9:8.1f} GFLOP  (GEMMs {gemm / 1e9:.1f} in {calls} calls, "
                f"fused attention {attention / 1e9:.1f})"
            )
        flops = {v: c[0] + c[1] for v, c in counts.items()}
        rows = []
        for r in range(rounds):
            gemm_s = workers["fastnest"].gemm_seconds()
            times = {v: _warm_seconds(w) for v, w in workers.items()}
            row = {
                "GEMM rate GFLOP/s": counts["fastnest"][0] / gemm_s / 1e9,
                "fastnest GFLOP/s": flops["fastnest"] / times["fastnest"] / 1e9,
                "vanilla GFLOP/s": flops["vanilla"] / times["vanilla"] / 1e9,
            }
            row["gemm share"] = row["fastnest GFLOP/s"] / row["GEMM rate GFLOP/s"]
            for v in VARIANTS[1:]:
                row[f"fastnest/{v}"] = times["fastnest"] / times[v]
            row.update({f"{v} s": t for v, t in times.items()})
            rows.append(row)
            yield f"round {r + 1}: " + ", ".join(f"{k} {x:.3f}" for k, x in row.items())
        yield f"medians over {rounds} alternated rounds:"
        for key in rows[0]:
            value = statistics.median(row[key] for row in rows)
            yield f"  {key:<28}{value:10.3f}{_met(key, value)}"
    finally:
        for w in workers.values():
            w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="retained",
        help="retained: freed host memory stays mapped in every worker, as in the fastnest CLI; system: glibc's "
        "defaults (default: retained)",
    )
    args = parser.parse_args()
    for line in measure(args.rounds, args.allocator):
        print(line, flush=True)


if __name__ == "__main__":
    main()
