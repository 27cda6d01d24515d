"""Where the all-scale step spends its time: a torch.profiler breakdown per forward and backward.

Run: ``python -m bench.profile_step [--steps 5] [--out FILE.md]`` (2 threads, the step benchmark's workload:
hidden 256, 4 layers, vocab 32000, batch 4, text 40-400 tokens). Each CPU op's self time is put in one
category: the ranges fastnest marks (``fastnest.plan``, ``fastnest.vision``, ``fastnest.connector``,
``fastnest.loss``, and the loss's and connector's backward nodes) win; otherwise the op's name decides
(GEMMs, attention kernels, copies and index traffic, the rest elementwise).
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastnest
from bench.workload import SCALES, build_batch, build_model

RANGES = {  # an enclosing range or autograd node -> its category
    "fastnest.plan": "planning (host)",
    "fastnest.vision": "vision tower",
    "fastnest.connector": "connector (fused projector + pooling)",
    "_ProjectPoolBackward": "connector (fused projector + pooling)",
    "fastnest.loss": "loss (fused linear CE)",
    "_FusedLinearCrossEntropyBackward": "loss (fused linear CE)",
}
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::addmv")
COPIES = (
    "aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::index_add_", "aten::index_put_",
    "aten::embedding", "aten::embedding_dense_backward", "aten::gather", "aten::scatter_add_", "aten::fill_",
    "aten::zero_", "aten::zeros", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::split",
    "aten::narrow", "aten::slice_backward", "aten::new_zeros", "aten::empty", "aten::resize_",
)  # fmt: skip


def category(event) -> str:
    node = event
    while node is not None:
        for key, name in RANGES.items():
            if key in node.name:
                return name
        node = node.cpu_parent
    if event.name in GEMM:
        return "GEMMs (language model)"
    if "scaled_dot_product" in event.name or "flash_attention" in event.name:
        return "attention"
    if event.name in COPIES:
        return "copies, concatenations, index traffic"
    return "elementwise and other (norms, SwiGLU, RoPE, residuals)"


def shares(prof) -> dict[str, float]:
    """Self CPU seconds per category (leaf work only: ranges' own self time is bookkeeping)."""
    out = collections.Counter()
    for event in prof.events():
        if event.name.startswith(("fastnest.", "autograd::engine")) or event.device_type.name != "CPU":
            continue
        out[category(event)] += event.self_cpu_time_total / 1e6
    return dict(out)


def measure(steps: int) -> dict:
    torch.set_num_threads(2)
    base = build_model()
    model = fastnest.patch_llava(copy.deepcopy(base), scales=SCALES)
    inputs = build_batch(model).inputs()
    for _ in range(2):  # warm-up
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
    phases = {"forward": collections.Counter(), "backward": collections.Counter()}
    walls = {"forward": 0.0, "backward": 0.0}
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            loss = model(**inputs).loss
            walls["forward"] += time.perf_counter() - t0
        phases["forward"].update(shares(prof))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            loss.backward()
            walls["backward"] += time.perf_counter() - t0
        phases["backward"].update(shares(prof))
    return {"steps": steps, "walls": walls, "phases": phases, "loss": float(loss)}


def markdown(result: dict) -> str:
    steps, walls = result["steps"], result["walls"]
    lines = [
        f"Profile of the all-scale step ({steps} profiled steps after 2 warm-up steps; loss {result['loss']:.4f}).",
        f"Wall per step (under the profiler): forward {walls['forward'] / steps:.3f} s, backward "
        f"{walls['backward'] / steps:.3f} s.",
        "",
        "| category | forward s/step | forward share | backward s/step | backward share | step share |",
        "|---|---|---|---|---|---|",
    ]
    fwd, bwd = result["phases"]["forward"], result["phases"]["backward"]
    total_f, total_b = sum(fwd.values()), sum(bwd.values())
    for name in sorted(set(fwd) | set(bwd), key=lambda n: -(fwd.get(n, 0) + bwd.get(n, 0))):
        f, b = fwd.get(name, 0.0), bwd.get(name, 0.0)
        lines.append(
            f"| {name} | {f / steps:.3f} | {100 * f / total_f:.1f}% | {b / steps:.3f} | {100 * b / total_b:.1f}% | "
            f"{100 * (f + b) / (total_f + total_b):.1f}% |"
        )
    lines.append(f"| all (self CPU time summed) | {total_f / steps:.3f} | | {total_b / steps:.3f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args()
    text = markdown(measure(args.steps))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
