"""Issue 2's step benchmark workload: a Llama-style hidden-256 LLaVA, batch 4, text 40-400 tokens.

Three ways to take one training step (forward + backward) on the same weights and batch:
- ``fastnest``: the patched model, every scale in one packed forward;
- ``released_loop``: the released M3 code's loop (vision + projector per scale, padded batch per scale,
  full fp32 logits), from tests/reference.py;
- ``vanilla``: plain Hugging Face LLaVA at one scale (576 tokens per image).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import re
import time
from collections.abc import Callable

import torch

import fastnest
from fastnest.tiny import tiny_llava
from tests.batches import IMG, make_batch
from tests.reference import released_m3_loss

SCALES = (1, 9, 36, 144, 576)
VARIANTS = ("fastnest", "released_loop", "vanilla")
SYSTEM_PROMPT = 35  # tokens before the image in LLaVA-1.5's template


def build_model(vocab: int = 32000):
    torch.manual_seed(0)
    return tiny_llava(
        grid=24,
        vision_hidden=256,
        vision_layers=2,
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=8,
        intermediate=688,
        vocab=vocab,
    ).train()


def build_batch(model, batch_size: int = 4, seed: int = 0):
    """Rows of 40-400 text tokens: a 35-token system prompt, the image, a question, then the answer.

    As in LLaVA instruction tuning, labels cover the answer only (the last half of the post-image text).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        text = int(torch.randint(40, 401, (1,), generator=g))
        after = text - SYSTEM_PROMPT if text > SYSTEM_PROMPT + 2 else 2
        question = after // 2
        rows.append([SYSTEM_PROMPT, IMG, question, after - question])
    return make_batch(model, rows, seed=seed)


def step_fn(variant: str, model, batch) -> Callable[[], float]:
    """A closure running one forward + backward of ``variant``; returns the loss."""
    if variant == "fastnest":
        model = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES)

        def run():
            return model(**batch.inputs()).loss
    elif variant == "released_loop":

        def run():
            return released_m3_loss(model, **batch.inputs(), scales=SCALES)[0]
    elif variant == "vanilla":

        def run():
            return model(**batch.inputs()).loss
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        return float(loss.detach())

    return step


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _llava_step(variant: str, vocab: int) -> Callable[[], float]:
    model = build_model(vocab)
    return step_fn(variant, model, build_batch(model))


def _serve(conn, make_step: Callable[..., Callable[[], float]], args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)
    step = make_step(*args)
    conn.send("ready")
    while (command := conn.recv()) != "stop":
        if command == "peak":  # resident memory one step adds at its peak over its inputs, and its time
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS watermark (Linux)
            before = _status("VmRSS")
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
            conn.send((_status("VmHWM") - before, seconds, loss))
        else:
            conn.send(step())


class Worker:
    """A step closure, built by the picklable ``make_step(*args)``, run in its own process.

    Each variant gets a fresh allocator: in one process, a variant inherits the heap the previous one left
    (the released loop's 3 GB makes the next variant's page faults vanish), which skews time ratios by 30%+.
    ``step()`` costs one pipe round-trip (microseconds) on top of the step.
    """

    def __init__(self, make_step: Callable[..., Callable[[], float]], *args, threads: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, make_step, args, threads), daemon=True)
        self._proc.start()
        self._conn.recv()

    def peak_step(self) -> tuple[int, float, float]:
        """One step's peak added bytes, its seconds and its loss; call first, before any step has warmed the heap."""
        self._conn.send("peak")
        return self._conn.recv()

    def peak_memory(self) -> int:
        """Peak bytes a step adds; call first, before any step has warmed the heap."""
        return self.peak_step()[0]

    def step(self) -> float:
        self._conn.send("step")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("stop")
        self._proc.join()


class StepWorker(Worker):
    """One variant's LLaVA training step in its own process."""

    def __init__(self, variant: str, vocab: int = 32000, threads: int = 2) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        super().__init__(_llava_step, variant, vocab, threads=threads)
