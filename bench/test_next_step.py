"""One all-scale training step of a tiny LLaVA-NeXT (anyres): fastnest vs. the released-style loop, CPU.

Run: ``python -m pytest bench/test_next_step.py --benchmark-only -s``. Model: the bench config's language model
(hidden 256, 4 layers, 8 heads, vocabulary 32000) and a 2-layer tower of width 256 on 48-pixel crops (a 24x24
grid per crop); batch 4 (a 35-token system prompt, one image, 40-400 text tokens, answer-only labels), every
image on a 2x2 grid plus its base crop (5 crops; sizes of four aspect ratios).

- ``fastnest``: ``patch_llava_next``: tower and projector once per crop, each crop pooled on its own, every
  (row, scale) sequence in one packed pass, the fused answer-only loss;
- ``released_loop``: per scale, the tower and projector again, the anyres arrangement, one padded LM pass and
  full fp32 logits (tools/next_reference.py), the losses' mean, one backward.

Each variant runs in its own process on 2 threads (bench/workload.py: Worker); its first step measures the peak
resident memory it adds on a cold heap, then timed steps alternate between the two so drift cancels. Targets:
<= 0.2x the loop's time and <= 0.3x its peak memory; printed side by side at the end of the run.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import fastnest
from bench.conftest import SUMMARIES
from bench.workload import SYSTEM_PROMPT, Worker
from fastnest.hf.tiny import tiny_llava_next
from tools.batches import IMG, make_anyres_batch
from tools.next_reference import released_next_loss

SCALES = (1, 9, 36, 144, 576)
VARIANTS = ("fastnest", "released_loop")
SIZES = [(96, 96), (99, 176), (176, 99), (55, 88)]  # (height, width): each on the 2x2 grid of 48-pixel crops
TIME_TARGET, MEMORY_TARGET = 0.2, 0.3
ROUNDS = 3
_FIGURES: dict[str, dict] = {}


def build_model():
    torch.manual_seed(0)
    return tiny_llava_next(
        vision_hidden=256, vision_layers=2, hidden=256, layers=4, heads=8, kv_heads=8, intermediate=688, vocab=32000
    ).train()


def build_batch(model, seed: int = 0) -> dict:
    """bench.workload's rows (40-400 text tokens: system prompt, image, question, answer) with anyres images."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in SIZES:
        text = int(torch.randint(40, 401, (1,), generator=g))
        after = text - SYSTEM_PROMPT if text > SYSTEM_PROMPT + 2 else 2
        rows.append([SYSTEM_PROMPT, IMG, after // 2, after - after // 2])
    return make_anyres_batch(model, rows, SIZES, seed=seed)


def next_step(variant: str):
    """A closure running one forward + backward of ``variant``; returns the loss (built in the worker)."""
    model = build_model()
    batch = build_batch(model)
    if variant == "fastnest":
        model = fastnest.patch_llava_next(copy.deepcopy(model), scales=SCALES)

        def loss():
            return model(**batch).loss
    else:

        def loss():
            return released_next_loss(model, **batch, scales=SCALES)[0]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return float(value.detach())

    return step


def _summary() -> list[str]:
    fast, loop = _FIGURES.get("fastnest"), _FIGURES.get("released_loop")
    if not (fast and loop):
        return []
    time_ratio = statistics.median(fast["times"]) / statistics.median(loop["times"])
    memory_ratio = fast["peak"] / loop["peak"]
    same = abs(fast["loss"] - loop["loss"]) <= 1e-5 * abs(loop["loss"])
    return [
        "",
        "LLaVA-NeXT all-scale step (ratio = fastnest / released-style loop), measured side by side:",
        f"  time:   fastnest {statistics.median(fast['times']):.2f} s | loop {statistics.median(loop['times']):.2f} s"
        f" | {time_ratio:.2f}x (target <= {TIME_TARGET}x: {'met' if time_ratio <= TIME_TARGET else 'NOT met'})",
        f"  memory: fastnest {fast['peak'] / 2**20:.0f} MiB | loop {loop['peak'] / 2**20:.0f} MiB | "
        f"{memory_ratio:.2f}x (target <= {MEMORY_TARGET}x: {'met' if memory_ratio <= MEMORY_TARGET else 'NOT met'})",
        f"  same loss: {'yes' if same else 'NO'} ({fast['loss']:.6f} vs {loop['loss']:.6f})",
    ]


SUMMARIES.append(_summary)


@pytest.fixture(scope="module")
def workers():
    started = {v: Worker(next_step, v) for v in VARIANTS}
    for variant, worker in started.items():  # first on a cold heap: the peak memory a step adds
        peak, _, loss = worker.peak_step()
        _FIGURES[variant] = {"peak": peak, "loss": loss, "times": []}
    yield started
    for worker in started.values():
        worker.close()


def test_next_step_side_by_side(benchmark, workers):
    """Both variants' steps alternated round by round (one warm-up round)."""

    def round_() -> None:
        for variant, worker in workers.items():
            loss, wall, _ = worker.timed_step()
            _FIGURES[variant]["times"].append(wall)
            _FIGURES[variant]["loss"] = loss

    round_()
    for figures in _FIGURES.values():
        figures["times"].clear()
    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({v: {k: f[k] for k in ("peak", "loss", "times")} for v, f in _FIGURES.items()})
    assert all(len(f["times"]) == ROUNDS for f in _FIGURES.values())
