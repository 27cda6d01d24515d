"""``fastnest convert`` / ``convert_original`` on tiny M3 LLaVA-1.5 checkpoints written in the original format:
every tensor round-trips bit for bit, the directory loads with no missing or unexpected keys, the converted
and patched model's logits equal the original forward (the -200 splice, pooling after the projector) at every
scale, the processor pads to a square as the released preprocessing, and config.fastnest restores the scales."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
)

import fastnest
from fastnest.hf.convert import MODELS, convert_original
from fastnest.train.cli import main
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

SCALES = [36, 9, 4, 1]  # a 6x6 grid
V = len(word_tokenizer())  # the original vocabulary; the converted one adds <image>, <pad>, then pads to 64
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0}  # vicuna's


def build(kind="llava", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    text, vision = tiny_configs(vocab=V)
    return OriginalLlava(text, vision, kind).to(dtype).eval()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """An M3 LLaVA-1.5 checkpoint: 3 safetensors shards with an index, the tower inside; and its conversion."""
    root = tmp_path_factory.mktemp("llava")
    model = build()
    clip = write_clip(model.model.vision_tower.vision_tower, root / "clip")
    config = original_config(model, str(clip), matryoshka_vis_token_scale=SCALES)
    state = write_original(model, root / "original", config, shards=3)
    (root / "original" / "generation_config.json").write_text(json.dumps(GENERATION))
    convert_original(root / "original", root / "hf")
    return model, state, root


def converted_tensors(directory):
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


def expected_name(name, target):
    """The Hugging Face name of an original one, written out rule by rule."""
    tower = "model.vision_tower.vision_tower.vision_model."
    if name.startswith(tower):
        nested = any(k.startswith("model.vision_tower.vision_model.") for k in target)
        return ("model.vision_tower.vision_model." if nested else "model.vision_tower.") + name[len(tower) :]
    if name.startswith("model.mm_projector.0."):
        return "model.multi_modal_projector.linear_1." + name[len("model.mm_projector.0.") :]
    if name.startswith("model.mm_projector.2."):
        return "model.multi_modal_projector.linear_2." + name[len("model.mm_projector.2.") :]
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


def target_names(directory):
    """The names Hugging Face's class has (transformers 5.0 nests the tower under vision_model., later not)."""
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return set(MODELS[config.model_type](config).state_dict())


def assert_round_trip(state, directory, tower_state=None, dtype=None):
    """Each original tensor under its new name, bit for bit (the vocabulary: first rows, then their mean)."""
    got = converted_tensors(directory)
    target = target_names(directory)
    assert set(got) == target
    rows = json.loads((directory / "config.json").read_text())["text_config"]["vocab_size"]
    assert rows % 64 == 0 and rows >= V + 2
    for name, tensor in state.items():
        new = expected_name(name, target)
        if new in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert got[new].shape == (rows, tensor.shape[1])
            assert torch.equal(got[new][:V].view(torch.uint8), tensor.view(torch.uint8))
            mean = (tensor.double().sum(0) / V).to(tensor.dtype)
            torch.testing.assert_close(got[new][V:], mean.expand(rows - V, -1), rtol=0, atol=1e-6)
        else:
            assert got[new].dtype == tensor.dtype, name
            assert torch.equal(got[new].view(torch.uint8), tensor.view(torch.uint8)), name
    for name, tensor in (tower_state or {}).items():  # read from a CLIP directory: cast to the checkpoint's dtype
        new = expected_name(
            "model.vision_tower.vision_tower.vision_model." + name.removeprefix("vision_model."), target
        )
        assert torch.equal(got[new], tensor.to(dtype or tensor.dtype)), name


def test_sharded_safetensors_round_trip_and_load(llava):
    model, state, root = llava
    assert_round_trip(state, root / "hf")
    loaded, info = LlavaForConditionalGeneration.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per source shard
    config = loaded.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.fastnest == {"scales": SCALES}
    assert json.loads((root / "hf" / "generation_config.json").read_text()) == GENERATION


def test_bin_bf16_tower_from_a_clip_directory(tmp_path):
    """pytorch_model.bin in 2 shards, bf16, no tower inside (read from --vision-tower, cast to bf16), and a
    rotary inv_freq buffer as old Llama checkpoints carry (dropped: not a weight)."""
    model = build(dtype=torch.bfloat16)
    torch.manual_seed(3)
    tower = build(seed=3).model.vision_tower.vision_tower  # fp32 CLIP weights, not the checkpoint's own
    clip = write_clip(tower, tmp_path / "clip")
    config = original_config(model, "openai/clip-vit-large-patch14-336", torch_dtype="bfloat16")
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8)}
    state = write_original(model, tmp_path / "original", config, shards=2, fmt="bin", tower=False, extra=inv_freq)
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "hf"), "--vision-tower", str(clip)]) == 0
    del state["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert_round_trip(state, tmp_path / "hf", tower.state_dict(), torch.bfloat16)
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.dtype == torch.bfloat16 and not hasattr(loaded.config, "fastnest")


def test_tokenizer_gains_image_and_pad_tokens(llava):
    _, _, root = llava
    original = AutoTokenizer.from_pretrained(root / "original")
    converted = AutoProcessor.from_pretrained(root / "hf").tokenizer
    assert converted.convert_tokens_to_ids("<image>") == V and converted.pad_token == "<pad>"
    assert converted.pad_token_id == V + 1
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["image_token_index"] == V and config["text_config"]["pad_token_id"] == V + 1
    text = "user describe the picture assistant a red dot"
    assert converted(text)["input_ids"] == original(text)["input_ids"]


def image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_processor_pads_to_a_square_as_released(llava):
    """The release's ``expand2square`` (the image centred on a square of the mean colour), then CLIP's own
    preprocessing, gives the converted processor's pixel values."""
    _, _, root = llava
    clip = AutoImageProcessor.from_pretrained(root / "clip")
    processor = AutoProcessor.from_pretrained(root / "hf")
    for width, height in ((40, 17), (13, 30)):
        picture = image(width, height)
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in clip.image_mean))
        square.paste(picture, ((side - width) // 2, (side - height) // 2))
        expected = torch.as_tensor(np.array(clip(square)["pixel_values"]))
        got = processor(text="<image> describe", images=picture, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_logits_equal_the_original_forward_at_every_scale(llava):
    model, _, root = llava
    converted = fastnest.patch(LlavaForConditionalGeneration.from_pretrained(root / "hf")).eval()
    assert fastnest.patch_state(converted).spec.scales == tuple(SCALES)  # from config.fastnest
    processor = AutoProcessor.from_pretrained(root / "hf")
    tokenizer = AutoTokenizer.from_pretrained(root / "original")
    before, after = "user describe the picture", "what colour is the dot assistant a red"
    inputs = processor(text=f"{before} <image> {after}", images=image(40, 17, seed=2), return_tensors="pt")
    ids = original_ids(tokenizer, before, after)
    for scale in SCALES:
        with torch.no_grad():
            got = converted(**inputs, scale=scale).logits
        want = original_logits(model, ids, inputs["pixel_values"], scale=scale)
        assert got.shape[1] == want.shape[1] == ids.shape[1] - 1 + scale
        torch.testing.assert_close(got[..., :V], want, rtol=1e-5, atol=1e-5)


def test_stored_scales_survive_save_and_load_and_explicit_ones_win(llava, tmp_path):
    _, _, root = llava
    model = LlavaForConditionalGeneration.from_pretrained(root / "hf")
    model.save_pretrained(tmp_path / "again")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert fastnest.patch(again).config.fastnest == {"scales": SCALES}
    assert fastnest.patch_state(again).spec.scales == tuple(SCALES)
    assert fastnest.patch_state(fastnest.patch(again, scales=(1, 4))).spec.scales == (1, 4)
    again.config.fastnest = [36]
    with pytest.raises(ValueError, match="config.fastnest must be a dict"):
        fastnest.patch(again)
