"""One training step of the original LLaVA code (llava-torch) patched by fastnest vs the released M3 fork's loop.

Run in the original code's environment (``python -m pytest bench/test_llava_original_step.py --benchmark-only -s``
builds it and runs this there; or ``python -m bench.llava_original_step`` with that environment's python and the
repository on PYTHONPATH). Model: the step benchmark's config in the original format (a 24x24 CLIP tower of
width 256, 2 layers, on 336-pixel images; mlp2x_gelu; a Llama of hidden 256, 4 layers, 8 heads, vocabulary
32000), frozen tower, fp32, 2 CPU threads; batch 4 (``tools.batches.mixed_rows``: a 35-token system prompt,
the image, 40-400 text tokens, answer-only labels), one IMAGE_TOKEN_INDEX marker per image.

- ``fastnest``: ``fastnest.integrations.llava_original.patch(model)``: forward (one packed pass) + backward;
- ``released``: the fork's loop as the tests re-state it (tools/llava_original.py: per scale the original input
  preparation with the projector output pooled, the full forward, fp32 logits, CE; the mean), + backward.

Rounds alternate the two (the machine's drift cancels in the ratio); medians and the ratio are printed side by
side (target: <= 0.3).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastnest.integrations.llava_original as fastnest_llava
from fastnest.constants import DEFAULT_SCALES
from tools.batches import mixed_rows
from tools.llava_original import original_batch, released_m3_loss, tiny_original_llava

TARGET = 0.3
VOCAB = 32000


def build(tower_dir: Path):
    model = tiny_original_llava(
        tower_dir, grid=24, patch=14, vision_hidden=256, hidden=256, layers=4, heads=8, kv_heads=8,
        intermediate=688, vocab=VOCAB,
    )  # fmt: skip
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = build(Path(tempfile.mkdtemp()))
    fast = fastnest_llava.patch(copy.deepcopy(plain))
    batch = original_batch(mixed_rows(4), vocab=VOCAB, image_size=336)

    def fastnest_step() -> torch.Tensor:
        out = fast(**batch)
        out.loss.backward()
        return out.scale_losses

    def released_step() -> torch.Tensor:
        loss, per_scale = released_m3_loss(plain, batch, DEFAULT_SCALES)
        loss.backward()
        return per_scale.detach()

    runs = {"fastnest": fastnest_step, "released": released_step}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses = {}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name, run in runs.items():
            for model in (fast, plain):
                model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            losses[name] = run()
            if round_:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = int(batch["attention_mask"].sum())
    print(
        f"scales {DEFAULT_SCALES}, batch 4 ({tokens} text tokens), {args.rounds} rounds, CPU fp32, {args.threads} threads"
    )
    agree = ((losses["fastnest"] - losses["released"]).abs() / losses["released"]).max().item()
    print(f"per-scale losses agree to {agree:.1e} relative")
    print(f"fastnest (one packed step):       {med['fastnest']:.3f} s")
    print(f"released loop (5 passes + logits): {med['released']:.3f} s")
    ratio = med["fastnest"] / med["released"]
    print(f"ratio: {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
