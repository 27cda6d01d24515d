"""One MQT training step over 4 token counts at once vs 4 released-style steps (one m each), CPU.

Run: ``python -m bench.mqt_step [--rounds N] [--counts 16,64,144,256]``. Model: the bench config (hidden 256,
4 layers, vocabulary 32000, a 24x24 tower of width 256) with a query transformer of M = 256 queries; batch 4
(``bench.workload.build_batch``: a 35-token system prompt, the image, 40-400 text tokens, answer-only labels).

- ``fastnest``: ``fastnest.patch(model, num_tokens=counts)``: tower and connector once, every count in one
  packed pass where each row's leading text and its image's 256 query tokens are computed once (the count-m
  sequence continues the first m of them: the outputs are nested), the fused answer-only loss (forward +
  backward);
- ``released``: per count, what the release's step runs: Hugging Face's own forward of the unpatched model on
  inputs holding m placeholders per image (tower + connector at m queries + the padded LM + full fp32 logits +
  cross-entropy), then backward; summed over the counts.

Rounds alternate the two (the machine's drift cancels in the ratio); medians of wall time and of this process's
CPU time (``time.process_time``: what other jobs on a shared machine disturb least) are printed side by side with
their ratios (target: <= 0.35 in wall time on a quiet machine).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastnest
from bench.workload import build_batch
from fastnest.hf.tiny import tiny_mqt_llava

M = 256
TARGET = 0.35


def build_model():
    torch.manual_seed(0)
    return tiny_mqt_llava(
        num_queries=M, query_heads=8, grid=24, vision_hidden=256, hidden=256, layers=4, vocab=32000
    ).train()


def at_count(batch, image_id: int, m: int) -> dict:
    """The batch with each image's M placeholders cut to m (right padding kept)."""
    rows, labels = [], []
    for ids, mask, lab in zip(batch.input_ids, batch.attention_mask, batch.labels):
        ids, lab = ids[mask.bool()], lab[mask.bool()]
        image = ids == image_id
        keep = ~image | ((torch.cumsum(image.int(), 0) - 1) % M < m)
        rows.append(ids[keep])
        labels.append(lab[keep])
    width = max(len(r) for r in rows)
    out_ids = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask = torch.zeros(len(rows), width, dtype=torch.long)
    out_labels = torch.full((len(rows), width), -100)
    for b, (r, lab) in enumerate(zip(rows, labels)):
        out_ids[b, : len(r)], out_mask[b, : len(r)], out_labels[b, : len(r)] = r, 1, lab
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}


def released_step(model, batch, counts) -> torch.Tensor:
    """Per-count losses of 4 released-style steps (each with its backward)."""
    conn, losses = model.model.query_abstractor, []
    for m in counts:
        conn.forward = lambda feats, m=m: type(conn).forward(conn, feats, m)
        try:
            out = model(**at_count(batch, model.config.image_token_id, m), pixel_values=batch.pixel_values)
            out.loss.backward()
        finally:
            del conn.forward
        losses.append(out.loss.detach())
    return torch.stack(losses)


def fastnest_step(model, batch) -> torch.Tensor:
    out = model(**batch.inputs())
    out.loss.backward()
    return out.scale_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", default="16,64,144,256")
    args = parser.parse_args()
    counts = tuple(int(c) for c in args.counts.split(","))
    plain = build_model()
    fast = fastnest.patch(copy.deepcopy(plain), num_tokens=counts).train()
    batch = build_batch(plain, tokens_per_image=M)
    assert int((batch.input_ids == plain.config.image_token_id).sum()) == M * batch.pixel_values.shape[0]
    runs = {"fastnest": lambda: fastnest_step(fast, batch), "released": lambda: released_step(plain, batch, counts)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    losses = {}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name, run in runs.items():
            for model in (fast, plain):
                model.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name] = run()
            if round_:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"counts {counts}, M={M}, batch {batch.input_ids.shape[0]}, {args.rounds} rounds, CPU fp32")
    agree = ((losses["fastnest"] - losses["released"]).abs() / losses["released"]).max().item()
    print(f"per-count losses agree to {agree:.1e} relative")
    print(f"fastnest (one packed step): {med['fastnest']:.3f} s wall, {med_cpu['fastnest']:.3f} s CPU")
    print(f"released ({len(counts)} steps, one m each): {med['released']:.3f} s wall, {med_cpu['released']:.3f} s CPU")
    ratio = med["fastnest"] / med["released"]
    print(f"CPU-time ratio: {med_cpu['fastnest'] / med_cpu['released']:.2f}x")
    print(f"ratio: {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
