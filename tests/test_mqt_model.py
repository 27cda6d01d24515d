"""The mqt_llava Hugging Face model: its config, Auto registration, save/load round trip, released key names,
and its forward against a plain computation (tower layer -2 without CLS -> connector -> splice -> LM)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import fastnest.hf
from fastnest import MatryoshkaQueryTransformer
from fastnest.hf import MQTLlavaConfig, MQTLlavaForConditionalGeneration
from fastnest.hf.tiny import tiny_mqt_llava

M = 16


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = tiny_mqt_llava(num_queries=M, **kw).eval()
    with torch.no_grad():  # a trained table: loading must keep it, never recompute the formula
        model.model.query_abstractor.pos_embed.add_(0.1 * torch.randn(M, 32))
    return model


def inputs(model, images=2, seed=1):
    torch.manual_seed(seed)
    image = model.config.image_token_id
    ids = torch.tensor([[1, 2, *[image] * M, 5, 6] + [*[image] * M, 7] * (images - 1)])
    size = model.config.vision_config.image_size
    return ids, torch.randn(images, 3, size, size)


def test_config_registered_and_connector_options():
    config = MQTLlavaConfig(num_queries=64, query_heads=8, query_keys="features")
    assert isinstance(AutoConfig.for_model("mqt_llava"), MQTLlavaConfig)
    assert (config.num_queries, config.query_heads, config.query_keys) == (64, 8, "features")
    assert config.image_seq_length == 64
    with pytest.raises(Exception, match="query_keys"):
        MQTLlavaConfig(query_keys="image")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'.*'default'"):
        MQTLlavaConfig(vision_feature_select_strategy="full")


def test_connector_in_place_of_the_projector_under_the_released_names():
    model = build()
    assert isinstance(model.model.query_abstractor, MatryoshkaQueryTransformer)
    assert not hasattr(model.model, "multi_modal_projector")
    released = {
        "query", "pos_embed", "proj", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias", "ln_v.weight", "ln_v.bias",
    }  # fmt: skip
    keys = {k.removeprefix("model.query_abstractor.") for k in model.state_dict() if "query_abstractor" in k}
    assert keys == released
    torch.manual_seed(5)  # a released-style state dict loads by name
    other = MatryoshkaQueryTransformer(32, 64, num_queries=M, num_heads=4, grid=6)
    sd = {f"model.query_abstractor.{k}": v for k, v in other.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "query_abstractor" in k]
    torch.testing.assert_close(model.model.query_abstractor.query, other.query, rtol=0, atol=0)


@pytest.mark.parametrize("keys", ["positional", "features"])
def test_forward_equals_plain_computation(keys):
    model = build(query_keys=keys)
    ids, pixels = inputs(model)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        rows = model.model.query_abstractor(feats, M).reshape(-1, 64)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = rows
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(logits, model.lm_head(hidden), rtol=1e-5, atol=1e-5)
    feats_out = model.get_image_features(pixel_values=pixels).pooler_output
    assert [tuple(f.shape) for f in feats_out] == [(M, 64), (M, 64)]


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = build(query_keys="features", query_heads=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is MQTLlavaForConditionalGeneration
    assert (loaded.config.num_queries, loaded.config.query_heads, loaded.config.query_keys) == (M, 2, "features")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0, msg=k)
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits
        )
    assert type(AutoModel.from_pretrained(tmp_path)) is fastnest.hf.MQTLlavaModel


def test_image_sizes_refused():
    model = build()
    _, pixels = inputs(model, images=1)
    with pytest.raises(ValueError, match="image_sizes is not supported"):
        model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[84, 84]]))
