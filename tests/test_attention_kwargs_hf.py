"""Hugging Face's attention kwargs reach the packed attention (issue 18, item 7): a LLaVA over a Mistral
(sliding window) and over a Gemma-2 (sliding window on alternate layers, logit softcap) trains with the
attention it infers with: the packed step's per-scale losses equal the released loop's, which runs the
unpatched model's own attention per scale."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, Gemma2Config, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

import fastnest
from tools.batches import IMG, make_batch
from tools.m3_reference import released_m3_loss

SCALES = (1, 4, 16)
ROWS = [[6, IMG, 9], [3, IMG, 5, IMG, 4], [7]]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def build(text_cls, attn_implementation: str, **text_options) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=8,
        patch_size=2,
        hidden_size=16,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = text_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=96,
        max_position_embeddings=512,
        pad_token_id=0,
        **text_options,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=95,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config).train()


MISTRAL = (MistralConfig, "sdpa", {"sliding_window": 5})
GEMMA2 = (Gemma2Config, "eager", {"sliding_window": 5, "attn_logit_softcapping": 0.5, "query_pre_attn_scalar": 8})


@pytest.mark.parametrize(
    "model, attention, no_options",
    [
        (MISTRAL, "sdpa", {"sliding_window": None}),
        (MISTRAL, "flex", {"sliding_window": None}),
        (GEMMA2, "flex", {"attn_logit_softcapping": None}),
    ],
    ids=["mistral-sdpa", "mistral-flex", "gemma2-flex"],
)
def test_packed_step_uses_the_models_window_and_softcap(model, attention, no_options):
    text_cls, implementation, options = model
    ref = build(text_cls, implementation, **options)
    with torch.no_grad():  # larger attention scores (the init's are ~1e-3): the softcap bends them
        for layer in ref.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    batch = make_batch(ref, ROWS)
    with torch.no_grad():  # flex: forward only on CPU
        _, want = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
        fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, attention=attention).train()
        got = fast(**batch.inputs()).scale_losses
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        # the option matters here: the same weights without it give other losses
        plain = build(text_cls, implementation, **{**options, **no_options})
        plain.load_state_dict(ref.state_dict())
        _, other = released_m3_loss(plain, **batch.inputs(), scales=SCALES)
        assert not torch.allclose(other, want, rtol=1e-4, atol=0)


def test_softcap_on_sdpa_is_a_clear_error():
    text_cls, implementation, options = GEMMA2
    ref = build(text_cls, implementation, **options)
    fast = fastnest.patch_llava(ref, scales=SCALES, attention="sdpa").train()
    with pytest.raises(ValueError, match=r"'sdpa' does not support softcap=0.5; backends that do: \('flash', 'flex'\)"):
        fast(**make_batch(ref, ROWS).inputs())
