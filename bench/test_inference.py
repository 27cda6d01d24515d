"""Inference at each scale through the patched model vs. the plain model fed the same shortened inputs.

Run: ``python -m pytest bench/test_inference.py --benchmark-only -s`` (CPU, 2 threads, in this process).
Workload: the step benchmark's model (hidden 256, 4 layers, vocab 32000, a 24x24 CLIP-style grid) in eval
mode, batch 4 rows of a 35-token prompt, one image and a 20-token question. Per scale, alternated pairs of:
- prefill: ``patched(**inputs, scale=s)`` against the plain model given the same shortened sequence: its own
  tower and projector (``get_image_features``), ``F.avg_pool2d`` to ``s`` tokens, the pooled features
  scattered into the embeddings of the shortened ``input_ids`` (``fastnest.scaled_inputs``), and its own
  forward on those ``inputs_embeds`` — the work any M3 inference must do, without fastnest;
- a 32-token greedy ``generate`` the same two ways.
Targets: fastnest's overhead at most 5% of the prefill; and the prefill time at each scale against 576, beside
the token-count ratio (fewer tokens, faster prefill: the M3 paper's Table 9 point).
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import fastnest
from bench.conftest import SUMMARIES
from bench.workload import SYSTEM_PROMPT, build_model
from tools.batches import IMG, make_batch

SCALES = (1, 9, 36, 144, 576)
PAIRS = 7
NEW_TOKENS = 32
_RESULTS: dict[tuple[str, int], dict[str, float]] = {}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    plain = build_model().eval()
    fast = fastnest.patch_llava(copy.deepcopy(plain), scales=SCALES).eval()
    batch = make_batch(plain, [[SYSTEM_PROMPT, IMG, 20]] * 4, padding_side="left")
    return plain, fast, batch.inputs(labels=False)


def _plain_embeds(plain, fast, inputs, scale):
    """The plain model's own features pooled to ``scale``, in the embeddings of the shortened inputs."""
    feats = torch.stack(list(plain.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    n, tokens, d = feats.shape
    grid, kernel = math.isqrt(tokens), math.isqrt(tokens) // math.isqrt(scale)
    pooled = F.avg_pool2d(feats.transpose(1, 2).reshape(n, d, grid, grid), kernel).flatten(2).transpose(1, 2)
    short = fastnest.scaled_inputs(fast, **inputs, scale=scale)
    embeds = plain.get_input_embeddings()(short["input_ids"])
    where = (short["input_ids"] == plain.config.image_token_id)[..., None]
    return embeds.masked_scatter(where, pooled.reshape(-1, d).to(embeds.dtype)), short["attention_mask"]


def _prefill(plain, fast, inputs, scale):
    def patched():
        return fast(**inputs, scale=scale).logits

    def baseline():
        embeds, mask = _plain_embeds(plain, fast, inputs, scale)
        return plain(inputs_embeds=embeds, attention_mask=mask).logits

    return patched, baseline


def _generate(plain, fast, inputs, scale):
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}

    def patched():
        return fast.generate(**inputs, scale=scale, **options)[:, -NEW_TOKENS:]

    def baseline():
        embeds, mask = _plain_embeds(plain, fast, inputs, scale)
        return plain.generate(inputs_embeds=embeds, attention_mask=mask, **options)

    return patched, baseline


def _pairs(patched, baseline, rounds: int) -> dict[str, float]:
    with torch.no_grad():
        torch.testing.assert_close(patched(), baseline(), rtol=1e-4, atol=1e-4)  # same result; also a warm-up
        times = {"patched": [], "baseline": []}
        for _ in range(rounds):
            for name, fn in (("patched", patched), ("baseline", baseline)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["patched"], times["baseline"])]
    return {"patched": statistics.median(times["patched"]), "baseline": statistics.median(times["baseline"]),
            "ratio": statistics.median(ratios)}  # fmt: skip


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("what", ["prefill", "generate"])
def test_inference(benchmark, setup, what, scale):
    plain, fast, inputs = setup
    make = _prefill if what == "prefill" else _generate
    patched, baseline = make(plain, fast, inputs, scale)
    rounds = PAIRS if what == "prefill" else 3
    result = benchmark.pedantic(lambda: _pairs(patched, baseline, rounds), rounds=1, iterations=1)
    _RESULTS[(what, scale)] = result
    benchmark.extra_info.update(result)
    assert result["patched"] > 0


def _summary() -> list[str]:
    if not _RESULTS:
        return []
    lines = ["", f"inference through the patched model vs. plain HF on the shortened inputs ({torch.get_num_threads()}"
             " threads; medians of alternated pairs; overhead = patched / plain - 1):"]  # fmt: skip
    lines.append(f"  {'what':<9}{'scale':>6}{'patched s':>11}{'plain s':>9}{'overhead':>10}  target")
    for (what, scale), r in sorted(_RESULTS.items()):
        overhead = r["ratio"] - 1
        verdict = ("met" if overhead <= 0.05 else "NOT met") if what == "prefill" else ""
        target = f"<= 5% of the prefill: {verdict}" if what == "prefill" else ""
        lines.append(
            f"  {what:<9}{scale:>6}{r['patched']:>11.4f}{r['baseline']:>9.4f}{100 * overhead:>9.1f}%  {target}"
        )
    full = _RESULTS.get(("prefill", 576))
    if full:
        lines.append("  prefill at each scale vs. 576 (patched), beside the language model's token counts:")
        prompt = SYSTEM_PROMPT + 20
        for scale in SCALES:
            if ("prefill", scale) in _RESULTS:
                time_ratio = _RESULTS[("prefill", scale)]["patched"] / full["patched"]
                token_ratio = (prompt + scale) / (prompt + 576)
                lines.append(f"    {scale:>4} tokens/image: time {time_ratio:.2f}x   tokens {token_ratio:.2f}x")
    return lines


SUMMARIES.append(_summary)
