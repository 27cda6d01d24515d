"""Where the all-scale step spends its time: a torch.profiler breakdown per forward and backward.

Run: ``python -m bench.profile_step [--steps 5] [--out FILE.md]`` (2 threads, the step benchmark's workload:
hidden 256, 4 layers, vocab 32000, batch 4, text 40-400 tokens). Each CPU op's self time goes to a region,
by the ranges fastnest marks in the forward (``fastnest.plan``, ``fastnest.vision``, ``fastnest.connector``,
``fastnest.loss``; the rest is the language model) — a backward op to the region of the forward op it
differentiates (autograd sequence numbers) — and, inside the language model and the loss, to a kind by the
op's name (GEMMs, attention kernels, copies and index traffic, the rest elementwise).
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

REGIONS = {  # ranges fastnest marks in the forward -> region (a backward node belongs to its forward op's region)
    "fastnest.plan": "planning (host)",
    "fastnest.vision": "vision tower",
    "fastnest.connector": "connector (fused projector + pooling)",
    "fastnest.loss": "loss",
}
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::addmv")
COPIES = (
    "aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::index_add_", "aten::index_put_",
    "aten::embedding", "aten::embedding_dense_backward", "aten::gather", "aten::scatter_add_", "aten::fill_",
    "aten::zero_", "aten::zeros", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::split",
    "aten::narrow", "aten::slice_backward", "aten::new_zeros", "aten::empty", "aten::resize_",
)  # fmt: skip
LM = "language model"


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def forward_region(event) -> str:
    for node in _ancestors(event):
        if node.name in REGIONS:
            return REGIONS[node.name]
    return LM


def kind(event) -> str:
    if event.name in GEMM:
        return "GEMMs"
    if "scaled_dot_product" in event.name or "flash_attention" in event.name:
        return "attention"
    if event.name in COPIES:
        return "copies, concatenations, index traffic"
    return "elementwise and other"


def category(region: str, event) -> str:
    if region == LM:
        return f"{LM}: {kind(event)}"
    if region == "loss":
        return "loss: GEMMs" if kind(event) == "GEMMs" else "loss: CE kernel and the rest"
    return region


def _leaves(prof):
    """Ops that do work (ranges' and the autograd engine's own self time is bookkeeping)."""
    for event in prof.events():
        if not event.name.startswith(("fastnest.", "autograd::engine")) and event.device_type.name == "CPU":
            yield event


def forward_shares(prof) -> tuple[collections.Counter, dict[int, str]]:
    """Self CPU seconds per category, and the region of every autograd-recorded forward op by sequence number."""
    out, regions = collections.Counter(), {}
    for event in prof.events():
        if event.sequence_nr >= 0:
            regions[event.sequence_nr] = forward_region(event)
    for event in _leaves(prof):
        out[category(forward_region(event), event)] += event.self_cpu_time_total / 1e6
    return out, regions


def backward_shares(prof, regions: dict[int, str]) -> collections.Counter:
    """Self CPU seconds per category; each backward op counts in the region of the forward op it differentiates."""
    out = collections.Counter()
    for event in _leaves(prof):
        node = next((n for n in _ancestors(event) if n.name.startswith("autograd::engine::evaluate_function")), None)
        region = regions.get(node.sequence_nr, LM) if node is not None else LM
        out[category(region, event)] += event.self_cpu_time_total / 1e6
    return out


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
        shares, regions = forward_shares(prof)
        phases["forward"].update(shares)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            loss.backward()
            walls["backward"] += time.perf_counter() - t0
        phases["backward"].update(backward_shares(prof, regions))
    return {"steps": steps, "walls": walls, "phases": phases, "loss": float(loss.detach())}


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
