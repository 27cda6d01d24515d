"""Inference of a patched MQT-LLaVA at any m (model(..., scale=m), generate(..., scale=m)) against the
released connector at m queries written plainly, spliced into the prompt, and a greedy decode that
recomputes the whole sequence every step."""

from __future__ import annotations

import copy

import pytest
import torch

import fastnest
from fastnest.hf.tiny import tiny_mqt_llava
from tools.batches import IMG, make_batch
from tools.m3_reference import reference_greedy
from tools.mqt_reference import count_rows

M, STEPS = 16, 5


def pair(keys="positional", seed=0):
    torch.manual_seed(seed)
    ref = tiny_mqt_llava(num_queries=M, query_keys=keys).eval()
    with torch.no_grad():
        ref.model.query_abstractor.pos_embed.add_(0.1 * torch.randn(M, 32))
    return ref, fastnest.patch(copy.deepcopy(ref), num_tokens="released").eval()


def reference_rows(ref, batch, scales):
    """Each row's prompt embeddings, image i shown at scales[i] (one image per row here)."""
    rows = []
    for b, m in enumerate(scales):
        pixels = batch.pixel_values[b : b + 1]
        keep = slice(b, b + 1)
        embeds, _ = count_rows(ref, batch.input_ids[keep], batch.attention_mask[keep], pixels, batch.labels[keep], m)
        rows.append(embeds[0].detach())
    return rows


@pytest.mark.parametrize("keys", ["positional", "features"])
@pytest.mark.parametrize("m", [1, 2, 7, M])
def test_generate_and_forward_at_m_equal_the_reference(keys, m):
    ref, fast = pair(keys)
    batch = make_batch(ref, [[10, IMG, 20]], tokens_per_image=M)
    out = fast.generate(**batch.inputs(labels=False), scale=m, max_new_tokens=STEPS, do_sample=False)
    assert out[0, : batch.input_ids.shape[1]].tolist() == batch.input_ids[0].tolist()  # the caller's prompt
    (embeds,) = reference_rows(ref, batch, [m])
    assert out[0, batch.input_ids.shape[1] :].tolist() == reference_greedy(ref, embeds, STEPS)
    with torch.no_grad():
        logits = fast(**batch.inputs(labels=False), scale=m).logits
        hidden = ref.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
    torch.testing.assert_close(logits, ref.lm_head(hidden), rtol=1e-5, atol=1e-5)


def test_per_image_counts_in_a_left_padded_batch():
    ref, fast = pair()
    batch = make_batch(ref, [[10, IMG, 20], [3, IMG, 9]], padding_side="left", tokens_per_image=M)
    scales = [3, 12]
    out = fast.generate(**batch.inputs(labels=False), scale=scales, max_new_tokens=STEPS, do_sample=False)
    width = batch.input_ids.shape[1]
    for b, embeds in enumerate(reference_rows(ref, batch, scales)):
        assert out[b, width:].tolist() == reference_greedy(ref, embeds, STEPS), b


def test_default_is_all_queries_and_set_scale():
    ref, fast = pair()
    batch = make_batch(ref, [[10, IMG, 20]], tokens_per_image=M)
    with torch.no_grad():
        full = ref(**batch.inputs(labels=False)).logits  # Hugging Face's own forward: M query outputs
        torch.testing.assert_close(fast(**batch.inputs(labels=False)).logits, full, rtol=1e-5, atol=1e-5)
        fastnest.set_scale(fast, 5)
        assert fast(**batch.inputs(labels=False)).logits.shape[1] == full.shape[1] - (M - 5)


def test_inputs_already_at_m_pass_unchanged():
    ref, fast = pair()
    at_m = make_batch(ref, [[10, IMG, 20]], tokens_per_image=4)  # the caller expanded the image to m tokens
    full = make_batch(ref, [[10, IMG, 20]], tokens_per_image=M)
    with torch.no_grad():
        a = fast(**at_m.inputs(labels=False), scale=4).logits
        b = fast(**full.inputs(labels=False), scale=4).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, M + 1])
def test_count_outside_range_refused(bad):
    ref, fast = pair()
    batch = make_batch(ref, [[10, IMG, 20]], tokens_per_image=M)
    with pytest.raises(ValueError, match=rf"token count {bad} is not configured; configured counts: 1\.\.{M}"):
        fast(**batch.inputs(labels=False), scale=bad)


def test_processor_for_queries_end_to_end():
    pytest.importorskip("PIL.Image")
    from PIL import Image

    from tests.test_llava_processor import make_processor

    torch.manual_seed(0)
    ref = tiny_mqt_llava(num_queries=M, grid=24, image_token_id=2).eval()
    fast = fastnest.patch(copy.deepcopy(ref), num_tokens=(M,)).eval()
    processor = fastnest.processor_for_queries(make_processor(), M)
    inputs = processor(
        images=Image.new("RGB", (90, 60), (200, 30, 40)),
        text="USER: <image> what colour ? ASSISTANT:",
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == 2).sum()) == M
    out = fast.generate(**inputs, scale=4, max_new_tokens=STEPS, do_sample=False)
    labels = torch.full_like(inputs["input_ids"], -100)
    (embeds,), _ = count_rows(ref, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], labels, 4)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == reference_greedy(ref, embeds.detach(), STEPS)
    with pytest.raises(ValueError, match=r"num_queries = s² with s dividing the crop side 336, got 25"):
        fastnest.processor_for_queries(make_processor(), 25)
