"""``convert_original`` on a tiny MQT-LLaVA checkpoint in the original format (``query_abstractor_type``
``matry_query``): it loads into ``mqt_llava`` with no missing or unexpected keys, the connector keeps the
release's tensors, the training stage becomes ``config.fastnest["num_tokens"]``, and the converted, patched
model's logits at several counts m equal the original forward (the released connector at m queries, the -200
splice)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import fastnest
from fastnest.hf import MQTLlavaForConditionalGeneration
from fastnest.hf.convert import convert_original
from fastnest.hf.draw import TokenDraw
from tools.original_llava import (
    OriginalLlava,
    original_config,
    original_ids,
    original_logits,
    tiny_configs,
    word_tokenizer,
    write_clip,
    write_original,
)

V = len(word_tokenizer())
M = 16  # queries (the release hard-wires 256; its 16 heads are kept: the tiny tower is 32 wide)


def mqt_checkpoint(root, stage):
    torch.manual_seed(0)
    text, vision = tiny_configs(vocab=V)
    model = OriginalLlava(text, vision, "mqt_llava", num_queries=M).eval()
    clip = write_clip(model.model.vision_tower.vision_tower, root / "clip")
    # the MQT release records mm_projector_type (default 'linear') but builds no projector
    config = original_config(
        model, str(clip), query_abstractor_type="matry_query", num_visual_tokens=stage, mm_projector_type="linear"
    )
    state = write_original(model, root / "original", config, shards=2)
    convert_original(root / "original", root / "hf")
    return model, state


@pytest.fixture(scope="module")
def mqt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqt")
    model, state = mqt_checkpoint(root, "second_stage")
    return model, state, root


def test_loads_with_the_released_connector(mqt):
    model, state, root = mqt
    loaded, info = MQTLlavaForConditionalGeneration.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(AutoModelForImageTextToText.from_pretrained(root / "hf")) is MQTLlavaForConditionalGeneration
    config = loaded.config
    assert (config.num_queries, config.query_heads, config.query_keys) == (M, 16, "positional")
    for name, tensor in loaded.model.query_abstractor.state_dict().items():
        assert torch.equal(tensor, state[f"model.query_abstractor.{name}"]), name
    assert config.fastnest == {"num_tokens": "released"}  # second_stage: one count per step from 2, 4, ..., M
    assert isinstance(fastnest.patch_state(fastnest.patch(loaded)).draw, TokenDraw)
    stored = json.loads((root / "hf" / "config.json").read_text())
    assert stored["model_type"] == "mqt_llava" and stored["image_seq_length"] == M


def test_logits_equal_the_original_forward_at_several_counts(mqt):
    model, _, root = mqt
    converted = fastnest.patch(MQTLlavaForConditionalGeneration.from_pretrained(root / "hf")).eval()
    processor = AutoProcessor.from_pretrained(root / "hf")
    before, after = "user what colour is the square", "assistant green"
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (20, 31, 3), dtype=np.uint8))
    inputs = processor(text=f"{before} <image> {after}", images=picture, return_tensors="pt")
    assert int((inputs["input_ids"] == converted.config.image_token_id).sum()) == M
    ids = original_ids(AutoTokenizer.from_pretrained(root / "original"), before, after)
    for m in (1, 4, 9, M):
        with torch.no_grad():
            got = converted(**inputs, scale=m).logits
        want = original_logits(model, ids, inputs["pixel_values"], num_tokens=m)
        assert got.shape[1] == want.shape[1] == ids.shape[1] - 1 + m
        torch.testing.assert_close(got[..., :V], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("stage", "num_tokens"), [("first_stage", (M,)), ("4", (4,))])
def test_stages_become_num_tokens(tmp_path, stage, num_tokens):
    mqt_checkpoint(tmp_path, stage)
    loaded = MQTLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    state = fastnest.patch_state(fastnest.patch(loaded))
    assert state.draw().scales == num_tokens
    assert fastnest.patch_state(fastnest.patch(loaded, num_tokens=(2, 8))).draw().scales == (2, 8)  # explicit wins
