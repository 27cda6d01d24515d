"""The patched model as a Hugging Face drop-in at inference: every forward/generate mode behaves as the plain
model does at the same token count; per-image scales; training routing that leaves the config alone.

References: the plain model fed the shortened sequence as embeddings (tools/m3_reference.scaled_rows: the
released pooling, stated plainly), or the plain model itself where the scale is the full grid.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastnest
from fastnest.hf.tiny import tiny_llava
from tools.batches import IMG, make_batch
from tools.m3_reference import pooled_image_features, released_m3_loss, scaled_rows

SCALES = (1, 4, 16)  # a 4x4 grid


def build(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    model = tiny_llava(grid=4, patch_size=2, vision_hidden=16, vision_layers=1, hidden=32, heads=2, kv_heads=1,
                       vocab=96, attn_implementation=attn)  # fmt: skip
    return model.eval()


def pair(seed: int = 0, attn: str = "sdpa"):
    plain = build(seed, attn)
    return plain, fastnest.patch_llava(copy.deepcopy(plain), scales=SCALES)


ROWS = [[3, IMG, 5], [6, IMG, 2, IMG, 1], [4]]  # one image, two images, text only


def shortened(plain, batch, scale: int):
    """The batch at ``scale`` as plain embeddings, left padded: ``(inputs_embeds, attention_mask)``."""
    rows, _, _ = scaled_rows(plain, **batch.inputs(labels=False), labels=None, scale=scale)
    width = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return embeds, mask


MODES = {
    "greedy": {},
    "sampling": {"do_sample": True, "top_k": 5},
    "beam_search": {"num_beams": 3},
    "num_return_sequences": {"do_sample": True, "num_return_sequences": 2},
    "beam_return_sequences": {"num_beams": 3, "num_return_sequences": 2},
    "no_cache": {"use_cache": False},
    "dict_with_scores": {"return_dict_in_generate": True, "output_scores": True, "output_logits": True},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scale", [1, 4])
def test_generate_modes_equal_the_plain_model_at_the_same_token_count(mode, scale):
    plain, fast = pair(seed=1)
    batch = make_batch(plain, ROWS, padding_side="left")
    embeds, mask = shortened(plain, batch, scale)
    options = {"max_new_tokens": 4, **MODES[mode]}
    with torch.no_grad():
        torch.manual_seed(5)
        want = plain.generate(inputs_embeds=embeds, attention_mask=mask, **options)
        torch.manual_seed(5)
        got = fast.generate(**batch.inputs(labels=False), scale=scale, **options)
    got_seq, want_seq = (o if isinstance(o, torch.Tensor) else o.sequences for o in (got, want))
    width = batch.input_ids.shape[1]
    rows = got_seq.shape[0] // batch.input_ids.shape[0]
    assert torch.equal(got_seq[:, :width], batch.input_ids.repeat_interleave(rows, 0))  # the caller's prompt
    assert torch.equal(got_seq[:, width:], want_seq)  # from embeddings, generate returns the new tokens only
    if mode == "dict_with_scores":
        for a, b in zip(got.scores, want.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", ["assistant", "prompt_lookup", "static_cache"])
def test_other_decoding_equals_greedy_at_the_scale(extra):
    _, fast = pair(seed=2)
    batch = make_batch(fast, ROWS[:1], padding_side="left")
    options = {
        "assistant": {"assistant_model": copy.deepcopy(fast)},
        "prompt_lookup": {"prompt_lookup_num_tokens": 2},
        "static_cache": {"cache_implementation": "static"},
    }[extra]
    with torch.no_grad():
        greedy = fast.generate(**batch.inputs(labels=False), scale=4, max_new_tokens=5)
        other = fast.generate(**batch.inputs(labels=False), scale=4, max_new_tokens=5, **options)
    assert torch.equal(other, greedy)


def test_forward_options_follow_hugging_face():
    plain, fast = pair(seed=3, attn="eager")
    batch = make_batch(plain, ROWS[:2], padding_side="right")
    inputs = batch.inputs(labels=False)
    with torch.no_grad():
        full = fast(**inputs, scale=16, output_hidden_states=True, output_attentions=True)
        ref = plain(**inputs, output_hidden_states=True, output_attentions=True)
        for a, b in zip(full.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b)
        for a, b in zip(full.attentions, ref.attentions):
            torch.testing.assert_close(a, b)
        as_tuple = fast(**inputs, scale=4, return_dict=False)
        as_dict = fast(**inputs, scale=4)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], as_dict.logits)
        last = fast(**inputs, scale=4, logits_to_keep=1).logits
        torch.testing.assert_close(last[:, -1], as_dict.logits[:, -1])
        for model in (plain, fast):  # the config flag, as HF's own tests set it
            model.config.output_attentions = True
        flagged, plain_flagged = fast(**inputs, scale=16), plain(**inputs)
        assert (flagged.attentions is None) == (plain_flagged.attentions is None)
        for a, b in zip(flagged.attentions or (), plain_flagged.attentions or ()):
            torch.testing.assert_close(a, b)


def test_image_hidden_states_are_the_features_at_the_scale():
    plain, fast = pair(seed=4)
    batch = make_batch(plain, ROWS[:1])
    with torch.no_grad():
        out = fast(**batch.inputs(labels=False), scale=4)
        # transformers >= 5.2x: image_outputs.pooler_output, one tensor per image; 5.0: the features concatenated
        features = out.image_outputs.pooler_output if hasattr(out, "image_outputs") else out.image_hidden_states
        got = features if isinstance(features, torch.Tensor) else torch.cat(list(features))
        want = pooled_image_features(plain, batch.pixel_values, 4)
        torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]))


def test_per_image_scales_equal_per_image_calls():
    _, fast = pair(seed=5)
    batch = make_batch(fast, ROWS, padding_side="left")
    scales = [1, 16, 4]  # images in batch order: row 0's, then row 1's two
    with torch.no_grad():
        mixed = fast(**batch.inputs(labels=False), scale=scales)
        seen = fastnest.scaled_inputs(fast, **batch.inputs(labels=False), scale=scales)
        generated = fast.generate(**batch.inputs(labels=False), scale=scales, max_new_tokens=3)
        per_row = [(0, [1]), (1, [16, 4])]
        images = iter(batch.pixel_values)
        for b, row_scales in per_row:
            pixels = torch.stack([next(images) for _ in row_scales])
            row = {"input_ids": batch.input_ids[b : b + 1], "attention_mask": batch.attention_mask[b : b + 1]}
            alone = fast(**row, pixel_values=pixels, scale=row_scales)
            keep = seen["attention_mask"][b].bool()
            alone_keep = fastnest.scaled_inputs(fast, **row, pixel_values=pixels, scale=row_scales)["attention_mask"]
            torch.testing.assert_close(
                mixed.logits[b][keep], alone.logits[0][alone_keep[0].bool()], rtol=1e-4, atol=1e-5
            )
            one = fast.generate(**row, pixel_values=pixels, scale=row_scales, max_new_tokens=3)
            assert generated[b, -3:].tolist() == one[0, -3:].tolist()


def test_inputs_already_at_the_scale_and_processor_at_scale():
    from tests.train_helpers import tiny_model, tiny_processor

    processor = tiny_processor()
    fast = fastnest.patch_llava(tiny_model(processor, seed=6), scales=SCALES).eval()
    image = torch.rand(8, 8, 3).mul(255).to(torch.uint8).numpy()
    prompt = "USER: <image>\nwhat colour ? ASSISTANT:"
    full = processor(images=image, text=prompt, return_tensors="pt")
    small = fastnest.processor_at_scale(processor, 4)(images=image, text=prompt, return_tensors="pt")
    token = processor.tokenizer.image_token_id
    assert int((full.input_ids == token).sum()) == 16 and int((small.input_ids == token).sum()) == 4
    with torch.no_grad():
        torch.testing.assert_close(fast(**small, scale=4).logits, fast(**full, scale=4).logits)
    with pytest.raises(ValueError, match=r"scale 5 .*allowed scales: \(1, 4, 16\)"):
        fastnest.processor_at_scale(processor, 5)


def test_inputs_embeds_with_pixel_values():
    _, fast = pair(seed=7)
    batch = make_batch(fast, ROWS[:2], padding_side="left")
    embeds = fast.get_input_embeddings()(batch.input_ids)
    common = {"attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values, "scale": 4}
    with torch.no_grad():
        by_ids = fast(input_ids=batch.input_ids, **common).logits
        by_embeds = fast(inputs_embeds=embeds, **common).logits
        torch.testing.assert_close(by_embeds, by_ids)
        new_ids = fast.generate(input_ids=batch.input_ids, **common, max_new_tokens=3)[:, -3:]
        new_embeds = fast.generate(inputs_embeds=embeds, **common, max_new_tokens=3)
    assert torch.equal(new_embeds, new_ids)


def test_shift_labels_equal_labels_in_training_and_eval():
    _, fast = pair(seed=8)
    batch = make_batch(fast, ROWS)
    shifted = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=-100)
    inputs = batch.inputs(labels=False)
    other = torch.where(batch.labels >= 0, (batch.labels + 1) % 90, batch.labels)  # targets the loss must ignore
    fast.train()
    train_labels = fast(**inputs, labels=batch.labels).loss
    torch.testing.assert_close(fast(**inputs, labels=other, shift_labels=shifted).loss, train_labels)
    fast.eval()
    with torch.no_grad():
        for scale in (4, 16):
            eval_labels = fast(**inputs, labels=batch.labels, scale=scale).loss
            torch.testing.assert_close(
                fast(**inputs, labels=other, shift_labels=shifted, scale=scale).loss, eval_labels
            )
    past_the_end = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=7)
    with torch.no_grad():  # at full scale the batch is Hugging Face's as given, that target too
        plain_loss = fast(**inputs, labels=batch.labels, shift_labels=past_the_end, scale=16).loss
        assert torch.isfinite(plain_loss)
    with pytest.raises(ValueError, match="shift_labels has a target at the last position"):
        fast(**inputs, labels=batch.labels, shift_labels=past_the_end, scale=4)  # the shorter sequence
    with pytest.raises(ValueError, match="shift_labels has a target at the last position"):
        fast.train()(**inputs, labels=batch.labels, shift_labels=past_the_end)


@pytest.mark.parametrize("when", ["before", "after"])
def test_training_routing_leaves_the_config_and_follows_set_attn_implementation(when):
    plain = build(seed=9).train()
    batch = make_batch(plain, [[5, IMG, 7], [2, IMG, 9]])
    want, _ = released_m3_loss(plain, **batch.inputs(), scales=SCALES)
    fast = copy.deepcopy(plain)
    if when == "before":
        fast.set_attn_implementation("eager")
    fastnest.patch_llava(fast, scales=SCALES, share_prefix=True)
    if when == "after":
        fast.set_attn_implementation("eager")
    assert fast.config.text_config._attn_implementation == "eager"  # what the user set, not fastnest's
    torch.testing.assert_close(fast.train()(**batch.inputs()).loss, want, rtol=1e-5, atol=0)
    fast.eval()
    with torch.no_grad():  # inference uses the user's implementation: eager returns attention weights
        out = fast(**batch.inputs(labels=False), scale=4, output_attentions=True)
    assert all(a is not None for a in out.attentions)


def test_bad_scale_lists():
    _, fast = pair(seed=10)
    batch = make_batch(fast, ROWS)
    with pytest.raises(ValueError, match=r"one scale per image \(3 images\), got \[1, 4\]"):
        fast(**batch.inputs(labels=False), scale=[1, 4])
    with pytest.raises(ValueError, match=r"scale 9 is not configured"):
        fast(**batch.inputs(labels=False), scale=[1, 9, 4])


def test_bad_training_inputs_are_named():
    _, fast = pair(seed=11)
    fast.train()
    batch = make_batch(fast, ROWS)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"num_items_in_batch must be a positive count .* got {bad}"):
            fast(**batch.inputs(), num_items_in_batch=bad)
    padding = {
        **batch.inputs(),
        "attention_mask": torch.zeros_like(batch.attention_mask),
        "labels": torch.full_like(batch.labels, -100),
        "pixel_values": None,
    }
    with pytest.raises(ValueError, match="the batch holds no tokens"):
        fast(**padding)
    with pytest.raises(ValueError, match=r"pixel_values must be \[images, channels, height, width\], got shape"):
        fast(**{**batch.inputs(), "pixel_values": batch.pixel_values[0]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without CUDA")
def test_flex_without_cuda_warns_at_patch_time_and_its_training_step_is_refused():
    plain = build(seed=12)
    with pytest.warns(UserWarning, match="FlexAttention's backward needs CUDA"):
        fast = fastnest.patch_llava(copy.deepcopy(plain), scales=SCALES, attention="flex")
    batch = make_batch(fast, ROWS[:1])
    with pytest.raises(ValueError, match="FlexAttention's backward needs CUDA tensors, got cpu"):
        fast.train()(**batch.inputs())
