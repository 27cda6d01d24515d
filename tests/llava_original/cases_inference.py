"""Inference: the original code's own generate and eval forward, each image at the call's scale (``scale=s`` or
the released fork's ``matryoshka_vis_token_scale=s``), against a plain greedy loop and the unpatched model with
its projector output pooled to s (tools/llava_original.py)."""

from __future__ import annotations

import pytest
import torch

from fastnest.constants import DEFAULT_SCALES
from tests.llava_original.common import IMG, batch, fastnest_llava, pair
from tools.llava_original import encoding_at, reference_greedy

STEPS = 6
PROMPTS = [[5, IMG, 7], [3, IMG, 2, IMG, 4]]  # one image; two images in one row


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref, fast = pair(tmp_path_factory.mktemp("tower"), initializer_range=0.2)  # peaked logits: no near-ties
    return ref.eval(), fast.eval()


def _prompt(rows, seed):
    data = batch(rows, seed=seed)
    return data["input_ids"], data["images"]


@pytest.mark.parametrize("row", range(len(PROMPTS)))
def test_greedy_generate_at_every_scale(models, row):
    ref, fast = models
    ids, images = _prompt([PROMPTS[row]], seed=row)
    seen = set()
    for scale in DEFAULT_SCALES:
        expected = reference_greedy(ref, ids, images, scale, STEPS)
        for keyword in ("scale", "matryoshka_vis_token_scale"):  # fastnest's and the released fork's keyword
            out = fast.generate(ids, images=images, max_new_tokens=STEPS, do_sample=False, **{keyword: scale})
            assert out[0, -STEPS:].tolist() == expected, (scale, keyword)
        seen.add(tuple(expected))
    assert len(seen) > 1  # the scales lead to different answers: the scale reached the model


def test_default_scale_is_the_largest_and_is_the_original_codes_output(models):
    ref, fast = models
    ids, images = _prompt([PROMPTS[0]], seed=3)
    plain = ref.generate(ids, images=images, max_new_tokens=STEPS, do_sample=False)  # 576 tokens per image
    assert torch.equal(fast.generate(ids, images=images, max_new_tokens=STEPS, do_sample=False), plain)
    with torch.no_grad():
        logits = ref(input_ids=ids, images=images).logits
        torch.testing.assert_close(fast(input_ids=ids, images=images).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1, 36])
def test_eval_forward_honours_the_scale(models, scale):
    # log-likelihood evaluation: logits and loss at the scale asked for (the released fork's eval forward uses 576)
    ref, fast = models
    data = batch(seed=5)
    with torch.no_grad(), encoding_at(ref, scale):
        want = ref(**data)
    with torch.no_grad():
        for keyword in ("scale", "matryoshka_vis_token_scale"):
            got = fast(**data, **{keyword: scale})
            assert got.logits.shape == want.logits.shape
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)


def test_scale_errors(models):
    _, fast = models
    ids, images = _prompt([PROMPTS[0]], seed=0)
    with pytest.raises(ValueError, match=r"scale 4 is not configured; configured scales: \(1, 9, 36, 144, 576\)"):
        fast.generate(ids, images=images, max_new_tokens=1, scale=4)
    with pytest.raises(ValueError, match="scale=9 and matryoshka_vis_token_scale=36 disagree"):
        fast(input_ids=ids, images=images, scale=9, matryoshka_vis_token_scale=36)


def test_unpatch_restores_the_original_code(tmp_path):
    ref, fast = pair(tmp_path)
    data = batch()
    fastnest_llava.unpatch(fast)
    assert not any(name in fast.__dict__ for name in ("forward", "generate", "encode_images"))
    assert all("forward" not in layer.self_attn.__dict__ for layer in fast.get_model().layers)
    out = fast(**data)  # the original forward: one scale (576), full logits
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref(**data).loss, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="model is not patched"):
        fastnest_llava.unpatch(fast)
