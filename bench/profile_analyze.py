"""Where one batch of the analysis goes, fastnest's evaluation vs the released workflow (bench/test_analyze_speed.py).

Run: ``python -m bench.profile_analyze [--batches 5]`` (CPU, one thread; the built-in tiny LLaVA, random
weights; the built-in evaluation split, batch 16, scales 1/9/36/144/576). Prints the median over batches of
each part's seconds, and the language-model tokens each workflow runs: the language model sees every
(sample, scale) sequence in both, which bounds what one packed pass can save.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastnest
from fastnest.hf.forward import BoundModel, packed_pass
from fastnest.hf.state import patch_state
from fastnest.scales import DEFAULT_SCALES
from fastnest.train.analyze import score_batch
from fastnest.train.data_llava import BadSamples, Collator, SyntheticExamples
from fastnest.train.model import default_model_and_processor
from fastnest.train.run_analysis import SYNTHETIC_EVAL_SEED
from fastnest.train.template import SYSTEM_V1
from tools.m3_reference import padded_logits, pooled_image_features, scaled_rows

BATCH = 16


def _time(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def profile(batches: int) -> dict[str, float]:
    plain, processor = default_model_and_processor(seed=0)
    plain.eval()
    fast = fastnest.patch_llava(copy.deepcopy(plain), scales=DEFAULT_SCALES).eval()
    bound = BoundModel(fast, patch_state(fast), patch_state(fast).spec)
    examples, bad = SyntheticExamples(batches * BATCH, seed=SYNTHETIC_EVAL_SEED, turns=1), BadSamples("fail")
    collate = Collator(processor, 576, 4096, SYSTEM_V1)
    parts: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        parts.setdefault(name, []).append(value)

    with torch.no_grad():
        for first in range(0, batches * BATCH, BATCH):
            chosen = [examples.example(i, bad) for i in range(first, first + BATCH)]
            add("both: collate", _time(collate, chosen, bad))
            batch = collate(chosen, bad)
            inputs = batch.inputs
            add("fastnest: evaluate's batch (score_batch)", _time(score_batch, fast, batch))
            add("fastnest:   vision + connector, once", _time(bound.visual_rows, inputs["pixel_values"]))
            _, step = packed_pass(fast, **inputs)
            add("fastnest:   LM tokens", step.packed.total)
            released_tokens = 0
            for scale in DEFAULT_SCALES:
                pixels = inputs["pixel_values"]
                add(
                    "released: vision + projector + pool, per scale", _time(pooled_image_features, plain, pixels, scale)
                )
                embeds, _, _ = scaled_rows(plain, **inputs, scale=scale)
                add(f"released:   LM + full logits at {scale}", _time(padded_logits, plain, embeds))
                released_tokens += len(embeds) * max(len(e) for e in embeds)
            add("released:   LM tokens (padded)", released_tokens)
    return {name: statistics.median(v) for name, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"per batch of {BATCH}, median of {args.batches} batches, {torch.get_num_threads()} thread:")
    for name, value in profile(args.batches).items():
        print(f"  {name:<50}{value:>10.0f}" if "tokens" in name else f"  {name:<50}{value:>10.3f} s")


if __name__ == "__main__":
    main()
