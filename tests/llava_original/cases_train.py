"""Training: the patched original model's packed all-scale step against the released M3 loop, re-stated in
tools/llava_original.py over the UNPATCHED original code (per scale: its prepare_inputs_labels_for_multimodal
with the projector output pooled to s, the full forward, the cross-entropy; the mean over scales)."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers

from fastnest.constants import DEFAULT_SCALES
from tests.llava_original.common import IMG, batch, fastnest_llava, pair
from tools.compare import assert_grads_match
from tools.llava_original import IMAGE_TOKEN_INDEX, released_m3_loss


def test_environment_is_the_original_codes_and_the_core_imports_there():
    assert transformers.__version__ == "4.36.2"
    import llava.model  # noqa: F401

    assert "fastnest.hf" not in sys.modules  # the integration is built on the Hugging Face-free core


def _check_step(ref, fast, data, scales=DEFAULT_SCALES, train_tower=False):
    loss, per_scale = released_m3_loss(ref, data, scales, train_tower=train_tower)
    loss.backward()
    out = fast(**data)
    out.loss.backward()
    assert out.logits is None and out.scales == tuple(scales)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.scale_losses, per_scale.detach(), rtol=1e-5, atol=0)
    assert_grads_match(ref, fast, rtol=2e-4)
    return out


# (tower, share_prefix, config): the tower frozen (the release) or trained (the paper); with and without the
# shared prefix; gradient checkpointing; a tokenizer_model_max_length that cuts the two-image row at 576
# tokens per image (its answer with it) but not at 144
CASES = {
    "frozen-shared-truncated": ("frozen", True, {"tokenizer_model_max_length": 1000}),
    "trained-unshared-checkpointed": ("trained", False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_match_the_released_loop(tmp_path, case):
    tower, share_prefix, config = CASES[case]
    ref, fast = pair(tmp_path, {"share_prefix": share_prefix}, **config)
    for model in (ref, fast):
        model.get_vision_tower().vision_tower.requires_grad_(tower == "trained")
    if "checkpointed" in case:
        fast.gradient_checkpointing_enable()
    out = _check_step(ref, fast, batch(), train_tower=tower == "trained")
    tower_grads = [p.grad for p in fast.get_vision_tower().parameters() if p.grad is not None]
    assert bool(tower_grads) == (tower == "trained")  # the tower learns exactly when it requires grad
    # one packed pass: every image row at every scale (its 4 images), the text-only row once, the text before
    # the first image (5 + 4 tokens) once when shared; the cut two-image row loses 1167 - 1000 tokens at 576
    n = len(DEFAULT_SCALES)
    expected = (1 if share_prefix else n) * (5 + 4) + n * (12 + 3 + 8 + 6) + 4 * sum(DEFAULT_SCALES) + 30
    assert out.lm_tokens == expected - (1167 - 1000 if "truncated" in case else 0)


def test_mistral_with_a_sliding_window_shorter_than_the_rows(tmp_path):
    ref, fast = pair(tmp_path, family="mistral", sliding_window=40)  # MistralAttention (eager: 4.36 has no sdpa)
    _check_step(ref, fast, batch([[5, IMG, 30], [12, IMG, 20]]), scales=DEFAULT_SCALES)


def test_scale_subset_eager_attention_and_a_batch_of_text_only_rows(tmp_path):
    ref, fast = pair(tmp_path, {"scales": (36, 1)}, attn_implementation="eager")  # LlamaAttention (above: sdpa)
    _check_step(ref, fast, batch(), scales=(36, 1))
    for model in (ref, fast):
        model.zero_grad(set_to_none=True)
    _check_step(ref, fast, batch([[10, 20], [7, 9]]), scales=(36, 1))  # blank images only: none is spliced


def test_return_dict_false_gives_the_loss_first(tmp_path):
    _, fast = pair(tmp_path)
    data = batch()
    assert torch.equal(fast(**data, return_dict=False)[0], fast(**data).loss)


def test_bad_training_inputs_are_refused_by_name(tmp_path):
    _, fast = pair(tmp_path)
    data = batch()
    with pytest.raises(ValueError, match="got 3 images for rows with \\[1, 0, 2, 1\\] image markers.*5 here"):
        fast(**{**data, "images": data["images"][:3]})
    with pytest.raises(ValueError, match="images must be one \\[N, 3, H, W\\] tensor.*got a list"):
        fast(**{**data, "images": list(data["images"])})
    with pytest.raises(ValueError, match="scale=36 is for inference"):
        fast(**data, scale=36)
    with pytest.raises(ValueError, match="inputs_embeds is not supported by the fastnest training step"):
        fast(**data, inputs_embeds=torch.zeros(1))
    labels = data["labels"].clone()
    labels[data["input_ids"] == IMAGE_TOKEN_INDEX] = 7
    with pytest.raises(ValueError, match="labels must be -100 at image placeholder positions"):
        fast(**{**data, "labels": labels})
    fast.lm_head.weight.ds_status = "NOT_AVAILABLE"  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*ZeRO-2"):
        fast(**data)


def test_patch_refuses_what_it_cannot_run(tmp_path):
    ref, _ = pair(tmp_path)
    with pytest.raises(ValueError, match="scale 25 does not pool a 24x24 grid evenly"):
        fastnest_llava.patch(ref, scales=(1, 25))
    with pytest.raises(TypeError, match="expects an original-LLaVA model.*Linear"):
        fastnest_llava.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention 'bogus' is not one of"):
        fastnest_llava.patch(ref, attention="bogus")
    ref.get_vision_tower().select_feature = "cls_patch"
    with pytest.raises(ValueError, match="mm_vision_select_feature='cls_patch' keeps the CLS token"):
        fastnest_llava.patch(ref)


def test_mpt_variant_is_refused_by_name(tmp_path):
    # LlavaMptForCausalLM's decoder (blocks, ALiBi attention) is not Llama-style; its forward in llava-torch
    # 1.2.2 does not even match the arch's prepare_inputs_labels_for_multimodal
    from llava.model import LlavaMptConfig, LlavaMptForCausalLM

    pair(tmp_path)  # writes the tiny tower
    config = LlavaMptConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=300, mm_vision_tower=str(tmp_path), mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
    )  # fmt: skip
    model = LlavaMptForCausalLM(config)
    model.get_vision_tower().load_model()
    with pytest.raises(ValueError, match="LlavaMptModel is not a Llama-style decoder"):
        fastnest_llava.patch(model)
    assert "forward" not in model.__dict__
