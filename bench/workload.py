"""Step benchmark workloads: a Llama-style hidden-256 LLaVA, batch 4.

Workloads: ``"mixed"`` (issue 2: text 40-400 tokens per row) and ``"prefix"`` (issue 4's shared-prefix
target: a 35-token system prompt, the image, then ~100 tokens of question and answer).

Ways to take one training step (forward + backward) on the same weights and batch:
- ``fastnest``: the patched model, every scale in one packed forward (default options: on CPU the language
  model's fused native RMSNorm / SwiGLU / rotary kernels);
- ``fastnest/unfused``: the same with ``lm_kernels="torch"`` (the model's own elementwise code);
- ``fastnest/<attention>/<shared|unshared>``: the same with ``patch_llava(attention=..., share_prefix=...)``;
  flash/xformers/flex run on CUDA in bfloat16 (FlexAttention has no CPU backward);
- ``released_loop``: the released M3 code's loop (vision + projector per scale, padded batch per scale,
  full fp32 logits), from tools/m3_reference.py;
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
from bench.flop_count import FlopCount, gemm_operands, time_gemms
from fastnest.hf.tiny import tiny_llava
from fastnest.host_memory import retain_freed_memory
from tools.batches import IMG, SYSTEM_PROMPT, make_batch, mixed_rows
from tools.m3_reference import released_m3_loss

SCALES = (1, 9, 36, 144, 576)
VARIANTS = ("fastnest", "released_loop", "vanilla")
UNFUSED = "fastnest/unfused"
ATTENTIONS = ("sdpa", "flash", "xformers", "flex")
PREFIX_VARIANTS = tuple(f"fastnest/{a}/{s}" for a in ATTENTIONS for s in ("shared", "unshared"))
WORKLOADS = ("mixed", "prefix")


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


def build_batch(model, batch_size: int = 4, seed: int = 0, tokens_per_image: int | None = None):
    """Rows of 40-400 text tokens (``tools.batches.mixed_rows``): a 35-token system prompt, the image, a
    question, then the answer. As in LLaVA instruction tuning, labels cover the answer only.
    ``tokens_per_image``: placeholders per image (default the tower's grid², as LLaVA's processor).
    """
    return make_batch(model, mixed_rows(batch_size, seed), seed=seed, tokens_per_image=tokens_per_image)


def build_prefix_batch(model, batch_size: int = 4, seed: int = 0):
    """Rows of a 35-token system prompt, the image, then 90-110 text tokens: a question and its (labelled)
    answer, half each: the shape of LLaVA-1.5 instruction data, for the shared-prefix target."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        after = int(torch.randint(90, 111, (1,), generator=g))
        rows.append([SYSTEM_PROMPT, IMG, after // 2, after - after // 2])
    return make_batch(model, rows, seed=seed)


def check_variant(variant: str) -> dict:
    """``patch_llava`` options of a fastnest variant (``{}`` for the others); ValueError for unknown names."""
    if variant in VARIANTS:
        return {}
    if variant == UNFUSED:
        return {"lm_kernels": "torch"}
    if variant not in PREFIX_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {(*VARIANTS, UNFUSED, *PREFIX_VARIANTS)}")
    _, attention, share = variant.split("/")
    return {"attention": attention, "share_prefix": share == "shared"}


def variant_device(variant: str) -> torch.device:
    """CUDA for the CUDA-only attention backends (and FlexAttention, whose backward needs it), else CPU."""
    options = check_variant(variant)
    return torch.device("cuda" if options.get("attention", "sdpa") != "sdpa" else "cpu")


def step_fn(variant: str, model, batch) -> Callable[[], float]:
    """A closure running one forward + backward of ``variant``; returns the loss."""
    options = check_variant(variant)
    inputs = batch.inputs()
    if variant.startswith("fastnest"):
        device = variant_device(variant)
        model = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES, **options)
        if device.type == "cuda":
            model = model.to(device, torch.bfloat16)
            inputs = {k: v.to(device) for k, v in inputs.items()}

        def run():
            return model(**inputs).loss
    elif variant == "released_loop":

        def run():
            return released_m3_loss(model, **inputs, scales=SCALES)[0]
    else:  # vanilla

        def run():
            return model(**inputs).loss

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        return float(loss.detach())

    return step


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _llava_step(variant: str, vocab: int, workload: str) -> Callable[[], float]:
    model = build_model(vocab)
    return step_fn(variant, model, (build_prefix_batch if workload == "prefix" else build_batch)(model))


def _serve(conn, make_step: Callable[..., Callable[[], float]], args: tuple, threads: int, retain: bool) -> None:
    torch.set_num_threads(threads)
    if retain and not retain_freed_memory():
        raise RuntimeError("retain_memory=True needs glibc (fastnest.host_memory)")
    step = make_step(*args)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # the step was built on the GPU
    gemms, operands = None, None  # the counted step's GEMM shapes (bench/flop_count.py); operands on first "gemms"
    conn.send("ready")
    while (command := conn.recv()) != "stop":
        if command == "peak":  # memory one step adds at its peak over its inputs (device or resident), its time
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak-RSS watermark (Linux)
                before = _status("VmRSS")
            start = time.perf_counter()
            loss = step()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
            conn.send((peak - before, seconds, loss))
        elif command == "count":  # one step under the FLOP counter: (gemm FLOPs, attention FLOPs, GEMM calls)
            with FlopCount() as count:
                step()
            gemms, operands = count.gemms, None
            conn.send((count.gemm_flops, count.attention_flops, sum(count.gemms.values())))
        elif command == "gemms":  # seconds of the counted step's matrix products alone (torch.mm)
            # built here, not at the count: only the worker asked holds them (vanilla's are gigabytes)
            operands = operands or gemm_operands(gemms)
            conn.send(time_gemms(operands))
        elif command == "timed":  # (loss, wall s, this process's CPU s), measured here: no pipe in it
            wall, cpu = time.perf_counter(), time.process_time()
            loss = step()
            conn.send((loss, time.perf_counter() - wall, time.process_time() - cpu))
        else:
            conn.send(step())  # float(loss) waits for the step, on CUDA too


class Worker:
    """A step closure, built by the picklable ``make_step(*args)``, run in its own process.

    Each variant gets a fresh allocator: in one process, a variant inherits the heap the previous one left
    (the released loop's 3 GB makes the next variant's page faults vanish), which skews time ratios by 30%+.
    ``retain_memory``: the worker keeps freed memory mapped (``fastnest.host_memory``, as the fastnest CLI's
    process does), so steady-state steps page-fault nothing; peaks of added memory then mean nothing.
    ``step()`` costs one pipe round-trip (microseconds) on top of the step.
    """

    def __init__(
        self, make_step: Callable[..., Callable[[], float]], *args, threads: int = 2, retain_memory: bool = False
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, make_step, args, threads, retain_memory), daemon=True)
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

    def timed_step(self) -> tuple[float, float, float]:
        """``(loss, wall seconds, CPU seconds)`` of one step, timed inside the worker. On a shared machine
        CPU time tracks the work done more steadily than wall time (others' load stretches the latter)."""
        self._conn.send("timed")
        return self._conn.recv()

    def count_flops(self) -> tuple[int, int, int]:
        """One step under ``bench.flop_count.FlopCount``: ``(GEMM FLOPs, attention FLOPs, GEMM calls)``; keeps
        operands of its GEMM shapes for ``gemm_seconds``."""
        self._conn.send("count")
        return self._conn.recv()

    def gemm_seconds(self) -> float:
        """Seconds ``torch.mm`` takes for the counted step's GEMMs (same shapes, layouts and counts) here."""
        self._conn.send("gemms")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("stop")
        self._proc.join()


class StepWorker(Worker):
    """One variant's LLaVA training step in its own process."""

    def __init__(
        self, variant: str, vocab: int = 32000, threads: int = 2, workload: str = "mixed", retain_memory: bool = False
    ) -> None:
        check_variant(variant)
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
        super().__init__(_llava_step, variant, vocab, workload, threads=threads, retain_memory=retain_memory)
