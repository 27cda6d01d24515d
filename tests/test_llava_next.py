"""patch_llava_next against a plain re-statement of the released M3 LLaVA-NeXT arrangement
(tools/next_reference.py: per scale, each crop average-pooled on its own, stitched, the pooled map unpadded,
a newline per map row, base crop first, spliced, the full LM, full logits, CE; mean over scales). The
reference itself is checked against Hugging Face's own LlavaNext at full scale."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

import fastnest
from fastnest import MatryoshkaScales, anyres_layout
from fastnest.hf.tiny import tiny_llava, tiny_llava_next
from tools.batches import IMG, make_anyres_batch
from tools.compare import assert_grads_match
from tools.m3_reference import reference_greedy
from tools.next_reference import arrange, placeholder_count, released_next_loss, scaled_rows

SCALES = (1, 9, 36, 144, 576)
# (height, width) as the processor reports them, and the grid the tiny model's pinpoints
# [[48, 96], [96, 48], [96, 96]] (crops of 48 pixels) give each: a tie between 1x2 and 2x1 goes to the first.
# A batch holds 5 crops per image (the most), the padding crops never read.
WIDE, TALL, SQUARE, LANDSCAPE = (99, 176), (176, 60), (48, 48), (55, 88)
GRIDS = {WIDE: (2, 2), TALL: (2, 1), SQUARE: (1, 2), LANDSCAPE: (2, 2)}


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return tiny_llava_next(vision_layers=2, hidden=64, layers=2, vocab=384, **kw)


def unlabelled(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


MIXED_ROWS = (
    (12, IMG, 20),  # system prompt, image, answer
    (30,),  # text-only row
    (5, IMG, 7, IMG, 15),  # two images in one row (of different grids)
    (IMG, 9),  # image first: no prefix
)
MIXED_SIZES = [WIDE, TALL, SQUARE, LANDSCAPE]


@functools.cache
def _reference(seed: int, rows: tuple, sizes: tuple, rounding: str):
    ref = build(seed).train()
    batch = make_anyres_batch(ref, [list(r) for r in rows], list(sizes), "right", seed)
    loss, per_scale = released_next_loss(ref, **batch, scales=SCALES, rounding=rounding)
    loss.backward()
    return ref, loss.detach(), per_scale.detach()


def reference_step(seed: int, rows: tuple, sizes: tuple, padding_side: str, rounding="hf"):
    """The reference loop's model holding its gradients, the batch padded on ``padding_side``, the loss and
    per-scale losses (cached: the reference sees only valid tokens, so both paddings share one run)."""
    ref, loss, per_scale = _reference(seed, rows, sizes, rounding)
    return ref, make_anyres_batch(ref, [list(r) for r in rows], list(sizes), padding_side, seed), loss, per_scale


def patched(ref, **options):
    fast = fastnest.patch_llava_next(copy.deepcopy(ref), **options).train()
    fast.zero_grad(set_to_none=True)
    return fast


# --- the layout, without a model -------------------------------------------------------------------------


def test_token_counts_per_scale():
    # a 672x672 image on 336-pixel crops (a 2x2 grid of 24x24 maps): s + R(C + 1), R = C = 2 sqrt(s), no unpad
    layout = anyres_layout(MatryoshkaScales(24, SCALES), (2, 2), (672, 672))
    assert [layout.count(k) for k in range(5)] == [7, 51, 192, 744, 2928]
    assert [s + 2 * math.isqrt(s) * (2 * math.isqrt(s) + 1) for s in SCALES] == [7, 51, 192, 744, 2928]
    assert layout.placeholders == 2928 and layout.rows == 5 * sum(SCALES) + 1


def test_hugging_face_and_released_rounding_keep_different_rows():
    spec = MatryoshkaScales(24, SCALES)
    # 99 wide x 176 tall on a 2x2 grid of 48x48 maps: 99 * 48/176 = 27 exactly, in floats 26.999...: Hugging
    # Face keeps 28 columns at full scale, the release (int) 26
    hf, released = (anyres_layout(spec, (2, 2), (176, 99), u) for u in ("hf", "released"))
    assert hf.count(4) == 576 + 48 * (28 + 1) and released.count(4) == 576 + 48 * (26 + 1)
    # 88 wide x 55 tall at 144 tokens (a 24x24 pooled map): 16 rows vs 14
    hf, released = (anyres_layout(spec, (2, 2), (55, 88), u) for u in ("hf", "released"))
    assert hf.count(3) == 144 + 16 * 25 and released.count(3) == 144 + 14 * 25
    assert hf.placeholders == released.placeholders == 576 + 30 * 49  # the processor's count, either way
    with pytest.raises(ValueError, match="unpad must be one of"):
        anyres_layout(spec, (2, 2), (55, 88), "floor")


@pytest.mark.parametrize("grid_shape", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 3)])
@pytest.mark.parametrize("rounding", ["hf", "released"])
def test_layout_indexes_the_released_arrangement(grid_shape, rounding):
    """Each crop's rows as matryoshka_project writes them (every scale's block), then the newline: the
    layout's tokens at each scale are the released arrangement of the pooled crops."""
    spec = MatryoshkaScales(6, (1, 4, 9, 36))
    rows, cols = grid_shape
    crops, dim = 1 + rows * cols, 3
    g = torch.Generator().manual_seed(rows * 10 + cols)
    pooled = [torch.randn(crops, s, dim, generator=g) for s in spec.scales]
    newline = torch.randn(dim, generator=g)
    source = torch.cat([torch.cat(pooled, dim=1).flatten(0, 1), newline[None]])
    for size in [(60, 60), (37, 100), (100, 37), (71, 13), (13, 71), (59, 88)]:
        layout = anyres_layout(spec, grid_shape, size, rounding)
        pinpoints = [(cols * 48, rows * 48)]  # (width, height): the release's order, forcing the grid
        for k in range(len(spec.scales)):
            want = arrange(pooled[k], newline, (size[1], size[0]), pinpoints, 48, rounding)
            torch.testing.assert_close(source[layout.tokens[k]], want, rtol=0, atol=0)


# --- the reference is Hugging Face at full scale ----------------------------------------------------------


def test_reference_is_hugging_face_at_full_scale():
    model = build(1).eval()
    batch = make_anyres_batch(model, [[4, IMG, 6], [3, IMG, 2, IMG, 5], [7]], [WIDE, TALL, SQUARE], "left")
    with torch.no_grad():
        hf = model(**unlabelled(batch)).logits
        rows, _ = scaled_rows(model, **unlabelled(batch), labels=None, scale=576)
        for b, emb in enumerate(rows):
            want = model.lm_head(model.model.language_model(inputs_embeds=emb[None]).last_hidden_state)[0]
            torch.testing.assert_close(hf[b][batch["attention_mask"][b].bool()], want, rtol=1e-5, atol=1e-5)


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_training_matches_the_reference(padding_side, share_prefix):
    ref, batch, ref_loss, ref_scales = reference_step(0, MIXED_ROWS, tuple(MIXED_SIZES), padding_side)
    fast = patched(ref, share_prefix=share_prefix)
    out = fast(**batch)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.scale_losses, ref_scales, rtol=1e-5, atol=0)
    assert out.logits is None
    out.loss.backward()
    assert_grads_match(ref, fast)  # every parameter: tower, projector, image_newline, LM
    assert fast.model.image_newline.grad.abs().sum() > 0
    torch.testing.assert_close(fast.model.image_newline.grad, ref.model.image_newline.grad, rtol=2e-4, atol=1e-7)


def test_one_tower_pass_over_every_crop_one_packed_lm_pass():
    ref, batch, ref_loss, _ = reference_step(0, MIXED_ROWS, tuple(MIXED_SIZES), "right")
    fast = patched(ref)
    calls = {"tower": [], "lm": [], "projector": []}
    fast.model.vision_tower.register_forward_hook(lambda m, a, o: calls["tower"].append(a[0].shape[0]))
    fast.model.language_model.register_forward_hook(
        lambda m, a, kw, o: calls["lm"].append(kw["inputs_embeds"].shape), with_kwargs=True
    )
    original = fastnest.ops.projector.function._ProjectPool.apply

    def spy(*args):
        calls["projector"].append(args[0].shape[0])
        return original(*args)

    fastnest.ops.projector.function._ProjectPool.apply = spy
    try:
        torch.testing.assert_close(fast(**batch).loss, ref_loss, rtol=1e-5, atol=0)
    finally:
        fastnest.ops.projector.function._ProjectPool.apply = original
    crops = sum(1 + r * c for r, c in (GRIDS[s] for s in MIXED_SIZES))
    assert calls["tower"] == [crops]  # every crop once, the padding crops never
    assert calls["projector"] == [crops]  # the fused projector + pooling, each crop pooled on its own
    assert len(calls["lm"]) == 1 and calls["lm"][0][0] == 1  # one packed sequence


def test_released_rounding():
    """unpad="released" is the release's arrangement exactly (here it keeps fewer rows or columns at some
    scales than Hugging Face's rounding, so the losses differ), in training and at inference."""
    rows, sizes = ((6, IMG, 10), (4, IMG, 8)), (WIDE, LANDSCAPE)
    ref, batch, ref_loss, ref_scales = reference_step(3, rows, sizes, "right", rounding="released")
    with torch.no_grad():  # the rounding matters for these sizes: the release keeps fewer tokens
        for scale in (144, 576):
            released, hf = (scaled_rows(ref, **batch, scale=scale, rounding=r)[0] for r in ("released", "hf"))
            assert sum(map(len, released)) < sum(map(len, hf))
    fast = patched(ref, unpad="released")
    assert fastnest.patch_state(fast).adapter.unpad == "released"
    out = fast(**batch)
    torch.testing.assert_close(out.scale_losses, ref_scales, rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)
    fast.eval()
    with torch.no_grad():
        embeds, _ = scaled_rows(ref, **unlabelled(batch), labels=None, scale=576, rounding="released")
        got = fast(**unlabelled(batch), scale=576)  # the processor's runs (HF's count), cut to the release's
        seen = fastnest.scaled_inputs(fast, **unlabelled(batch), scale=576)
        for b, emb in enumerate(embeds):
            want = ref.lm_head(ref.model.language_model(inputs_embeds=emb[None]).last_hidden_state)[0]
            torch.testing.assert_close(got.logits[b][seen["attention_mask"][b].bool()], want, rtol=1e-4, atol=1e-5)


# --- inference --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_inference_logits_and_generate_match_the_reference(scale):
    ref = build(5).eval()
    fast = fastnest.patch_llava_next(copy.deepcopy(ref)).eval()
    batch = unlabelled(make_anyres_batch(ref, [[4, IMG, 6], [3, IMG, 2, IMG, 5], [7]], [TALL, WIDE, SQUARE], "left"))
    rows, _ = scaled_rows(ref, **batch, labels=None, scale=scale)
    with torch.no_grad():
        out = fast(**batch, scale=scale)
        seen = fastnest.scaled_inputs(fast, **batch, scale=scale)
        for b, emb in enumerate(rows):
            want = ref.lm_head(ref.model.language_model(inputs_embeds=emb[None]).last_hidden_state)[0]
            torch.testing.assert_close(out.logits[b][seen["attention_mask"][b].bool()], want, rtol=1e-4, atol=1e-5)
        generated = fast.generate(**batch, scale=scale, max_new_tokens=4, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(generated[:, :width], batch["input_ids"])
    for b, emb in enumerate(rows):
        assert generated[b, width:].tolist() == reference_greedy(ref, emb, 4)


def test_more_crops_at_inference_than_in_training():
    """The paper's zero-shot generalisation: a larger pinpoint set at inference (3x3 grids of 144-token crops)
    needs no retraining: set it on the config (and the processor) and infer."""
    ref = build(6).eval()
    fast = fastnest.patch_llava_next(copy.deepcopy(ref), scales=(36, 144)).eval()
    for model in (ref, fast):
        model.config.image_grid_pinpoints = [[48, 96], [96, 48], [96, 96], [144, 144]]
    size = (144, 144)
    batch = unlabelled(make_anyres_batch(ref, [[5, IMG, 4]], [size]))
    assert batch["pixel_values"].shape[1] == 10  # base + 3x3 crops
    rows, _ = scaled_rows(ref, **batch, labels=None, scale=144)
    with torch.no_grad():
        got = fast(**batch, scale=144).logits[0]
        want = ref.lm_head(ref.model.language_model(inputs_embeds=rows[0][None]).last_hidden_state)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.shape[0] == 5 + 144 + 36 * 37 + 4  # no unpad here: the 36x36 map, one newline per row


def test_processor_inputs_train_and_generate():
    """End to end from a real LlavaNextProcessor (in-memory tokenizer): its runs, crops and image_sizes."""
    Image = pytest.importorskip("PIL.Image")
    processor = next_processor()
    ref = build(7, image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>")).train()
    images = [Image.new("RGB", (176, 99), (200, 30, 30)), Image.new("RGB", (60, 176), (20, 40, 220))]
    texts = ["USER: <image> what colour ? ASSISTANT: red", "USER: describe <image> ASSISTANT: a blue shape"]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    labels = torch.full_like(batch["input_ids"], -100)
    for b, n in enumerate((1, 2)):
        cols = batch["attention_mask"][b].nonzero().squeeze(1)[-n:]
        labels[b, cols] = batch["input_ids"][b, cols]
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["image_sizes"].tolist() == [[99, 176], [176, 60]]
    ref_loss, ref_scales = released_next_loss(ref, **batch, labels=labels, scales=SCALES)
    ref_loss.backward()
    fast = patched(ref)
    out = fast(**batch, labels=labels)
    torch.testing.assert_close(out.scale_losses, ref_scales.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)
    fast.eval()
    with torch.no_grad():
        ids = fast.generate(**{k: v[:1] for k, v in batch.items()}, scale=9, max_new_tokens=3, do_sample=False)
    rows, _ = scaled_rows(ref.eval(), **{k: v[:1] for k, v in batch.items()}, labels=None, scale=9)
    assert ids[0, -3:].tolist() == reference_greedy(ref, rows[0], 3)


def test_processor_at_scale_writes_the_counts_at_that_scale():
    """processor_at_scale on a LlavaNextProcessor: its runs are the layout's counts at the scale (Hugging Face
    rounding), which the patched model takes as they are."""
    Image = pytest.importorskip("PIL.Image")
    processor = next_processor()
    fast = fastnest.patch_llava_next(build(11, image_token_id=383)).eval()
    prompt = "USER: <image> what colour ? ASSISTANT:"
    spec = MatryoshkaScales(24, SCALES)
    for width, height in [(176, 99), (60, 176), (48, 48), (88, 55), (97, 61)]:
        image = Image.new("RGB", (width, height), (20, 200, 90))
        full = processor(images=[image], text=[prompt], return_tensors="pt")
        grid = fastnest.patch_state(fast).adapter.grid_shape(fast, (height, width))
        for k, scale in enumerate((1, 9, 36, 144)):
            small = fastnest.processor_at_scale(processor, scale)(images=[image], text=[prompt], return_tensors="pt")
            count = anyres_layout(spec, grid, (height, width)).count(k)
            assert int((small["input_ids"] == 383).sum()) == count
            if width == 97:
                with torch.no_grad():
                    torch.testing.assert_close(fast(**small, scale=scale).logits, fast(**full, scale=scale).logits)


def next_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    try:  # the PIL-backed class: no torchvision needed
        from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
    except ImportError:  # transformers 5.0
        from transformers import LlavaNextImageProcessor

    words = "USER: ASSISTANT: what colour ? red blue a shape describe".split()
    vocab = {"<pad>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(words)} | {"<image>": 383}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}
    )
    images = LlavaNextImageProcessor(
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]],
    )
    # as in the llava-hf checkpoints: the CLS token counted, then dropped by the "default" strategy
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


# --- the patch: registry, scale, unpatch, errors ---------------------------------------------------------


def test_patch_dispatches_set_scale_unpatch():
    model = build(8).eval()
    fast = fastnest.patch(copy.deepcopy(model), scales=(9, 144))
    assert fastnest.PATCHES["llava_next"] is fastnest.patch_llava_next
    assert fastnest.patch_state(fast).spec.scales == (9, 144)
    batch = unlabelled(make_anyres_batch(model, [[3, IMG, 4]], [SQUARE]))
    with torch.no_grad():
        # the largest scale by default; a square on a 1x2 grid keeps the middle half of the 12x24 map
        assert fast(**batch).logits.shape[1] == 3 + 144 + 12 * (12 + 1) + 4
        fastnest.set_scale(fast, 9)  # 3x6 map: 3 columns of image, padding (6 - 3) // 2 = 1 a side, 4 kept
        assert fast(**batch).logits.shape[1] == 3 + 9 + 3 * (4 + 1) + 4
        fastnest.unpatch(fast)
        torch.testing.assert_close(fast(**batch).logits, model(**batch).logits)


def test_adapter_gives_the_trainer_its_parts():
    model = build(9)
    adapter = fastnest.patch_state(fastnest.patch_llava_next(model)).adapter
    groups = adapter.parameter_groups(model)
    assert any(p is model.model.image_newline for p in groups["projector"])
    named = {id(p) for ps in groups.values() for p in ps}
    assert named == {id(p) for p in model.parameters()}  # every parameter in exactly one group
    assert len(adapter.shard_units(model)) == 2 + 2  # decoder layers + vision encoder layers
    dummy = adapter.dummy_row(model)  # one blank crop-sized image, label-free
    assert dummy["pixel_values"].shape == (1, 3, 3, 48, 48) and dummy["image_sizes"].tolist() == [[48, 48]]
    assert int((dummy["input_ids"] == model.config.image_token_id).sum()) == placeholder_count(model, SQUARE)
    with torch.no_grad():  # Hugging Face's own forward checks the run against the image's features
        model.eval()(**{k: v for k, v in dummy.items() if k != "labels"})


def test_error_scale_the_grid_cannot_pool():
    with pytest.raises(ValueError, match=r"scale 25 .*allowed scales: \(1, 4, 9, 16, 36, 64, 144, 576\)"):
        fastnest.patch_llava_next(build(), scales=(1, 25))
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        fastnest.patch_llava_next(tiny_llava())
    with pytest.raises(ValueError, match="unpad must be one of"):
        fastnest.patch_llava_next(build(), unpad="floor")


def test_error_placeholder_runs_that_do_not_match_image_sizes():
    model = build(10)
    fast = fastnest.patch_llava_next(copy.deepcopy(model)).train()
    batch = make_anyres_batch(model, [[4, IMG, 6], [3, IMG, 5]], [WIDE, TALL])
    wrong = batch | {"image_sizes": torch.tensor([WIDE, SQUARE])}  # image 1's run is TALL's count
    found, expected = placeholder_count(model, TALL), placeholder_count(model, SQUARE)
    message = rf"image 1 \(row 1, column 3\) meets a run of {found} placeholder tokens where it takes {expected}"
    with pytest.raises(ValueError, match=message):
        fast(**wrong)
    fast.eval()
    with pytest.raises(ValueError, match=message):
        fast(**unlabelled(wrong), scale=36)
    with pytest.raises(ValueError, match="needs image_sizes"):
        fast(**{k: v for k, v in batch.items() if k not in ("labels", "image_sizes")}, scale=36)
    with pytest.raises(ValueError, match=r"image 0 of size \(99, 176\) needs 5 crops .* hold 3 per image"):
        fast(**unlabelled(batch) | {"pixel_values": batch["pixel_values"][:, :3]}, scale=36)
