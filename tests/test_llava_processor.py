"""End to end from a real LlavaProcessor (in-memory tokenizer, CLIP image processor as in llava-hf)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastnest
from fastnest.hf.tiny import tiny_llava
from tools.compare import assert_grads_match
from tools.m3_reference import reference_greedy, released_m3_loss, scaled_rows

Image = pytest.importorskip("PIL.Image")
WORDS = "USER: ASSISTANT: what colour is the shape ? red blue green a picture of and describe it large small".split()


def make_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<image>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}
    )
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    # As in the llava-hf checkpoints: 24*24 + 1 (CLS) - 1 (dropped by "default") = 576 placeholders per image.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


PROMPTS = [
    ("USER: <image> what colour is the shape ? ASSISTANT:", " red"),
    ("USER: a picture of <image> and <image> describe it ASSISTANT:", " a large red shape and a small blue shape"),
    ("USER: what colour is green ? ASSISTANT:", " green"),
]


def processor_batch(processor, padding_side: str):
    g = torch.Generator().manual_seed(0)
    colours = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g)) for _ in range(3)]
    images = [Image.new("RGB", (80 + 20 * i, 60), colours[i]) for i in range(3)]
    processor.tokenizer.padding_side = padding_side
    texts = [p + a for p, a in PROMPTS]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(batch.input_ids, -100)
    for b, (_, answer) in enumerate(PROMPTS):  # labels on the answer only
        n = len(answer.split())
        cols = batch.attention_mask[b].nonzero().squeeze(1)[-n:]
        labels[b, cols] = batch.input_ids[b, cols]
    return dict(batch) | {"labels": labels}


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_processor_outputs_train_like_the_released_loop(padding_side):
    processor = make_processor()
    torch.manual_seed(0)
    ref = tiny_llava(grid=24, vocab=64, image_token_id=processor.tokenizer.image_token_id).train()
    fast = fastnest.patch_llava(copy.deepcopy(ref)).train()
    batch = processor_batch(processor, padding_side)
    assert int((batch["input_ids"] == processor.tokenizer.image_token_id).sum()) == 3 * 576
    ref_loss, ref_scales = released_m3_loss(ref, **batch, scales=fastnest.DEFAULT_SCALES)
    out = fast(**batch)
    torch.testing.assert_close(out.scale_losses, ref_scales.detach(), rtol=1e-5, atol=0)
    ref_loss.backward()
    out.loss.backward()
    assert_grads_match(ref, fast)


def test_processor_outputs_generate_at_a_scale():
    processor = make_processor()
    torch.manual_seed(1)
    ref = tiny_llava(grid=24, vocab=64, image_token_id=processor.tokenizer.image_token_id).eval()
    fast = fastnest.patch_llava(copy.deepcopy(ref)).eval()
    batch = processor_batch(processor, "left")
    batch.pop("labels")
    with torch.no_grad():
        generated = fast.generate(**batch, scale=9, max_new_tokens=4, do_sample=False)
        rows, _, _ = scaled_rows(ref, **batch, labels=None, scale=9)
    width = batch["input_ids"].shape[1]
    for b, emb in enumerate(rows):
        assert generated[b, width:].tolist() == reference_greedy(ref, emb, 4)
