"""patch_llava against the released algorithm (tools/m3_reference.py), on CPU (and on CUDA where there is one)."""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch

import fastnest
from fastnest.hf.tiny import tiny_llava
from tools.batches import IMG, make_batch
from tools.compare import assert_grads_match
from tools.m3_reference import reference_greedy, released_m3_loss, scaled_rows

SCALES = (1, 9, 36, 144, 576)


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return tiny_llava(grid=24, vision_hidden=32, vision_layers=2, hidden=64, layers=2, vocab=384, **kw)


def pair(seed: int = 0, scales=SCALES, **kw):
    """A reference (plain HF) model and a patched copy with identical weights, both in train mode."""
    ref = build(seed, **kw).train()
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=scales).train()
    return ref, fast


@functools.cache
def released_step(seed: int, rows: tuple, padding_side: str = "right", scales=SCALES, answer_only=True, **kw):
    """The released loop's loss and gradients on a fresh model (cached: tests compare several patched copies
    with one reference step). Returns ``(ref model holding its gradients, batch, loss, per-scale losses)``."""
    ref = build(seed, **kw).train()
    batch = make_batch(ref, [list(r) for r in rows], padding_side=padding_side, answer_only=answer_only)
    loss, per_scale = released_m3_loss(ref, **batch.inputs(), scales=scales)
    loss.backward()
    return ref, batch, loss.detach(), per_scale.detach()


def patched(ref, scales=SCALES, **options):
    """A patched copy of ``ref`` in train mode, without ``ref``'s gradients."""
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=scales, **options).train()
    fast.zero_grad(set_to_none=True)
    return fast


MIXED_ROWS = (
    (35, IMG, 40),  # system prompt, image, answer
    (5, IMG, 200),  # long text
    (60,),  # text-only row
    (10, IMG, 7, IMG, 25),  # two images in one row: the prefix is the text before the first
    (IMG, 30),  # image first: no prefix
)
SHARE = pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "unshared"])


@SHARE
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_training_matches_released_loop(padding_side, share_prefix):
    ref, batch, ref_loss, ref_scales = released_step(0, MIXED_ROWS, padding_side)
    fast = patched(ref, share_prefix=share_prefix)
    out = fast(**batch.inputs())
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.scale_losses, ref_scales, rtol=1e-5, atol=0)
    assert out.loss.dtype == torch.float32 and not out.scale_losses.requires_grad
    assert out.logits is None  # no full logits in training
    out.loss.backward()
    assert_grads_match(ref, fast)


@SHARE
def test_custom_scale_subset_and_all_text_labels(share_prefix):
    # every text token labelled: the prefixes hold targets, counted once per scale either way
    ref, batch, _, ref_scales = released_step(1, ((3, IMG, 30), (12, IMG, 9)), scales=(9, 576), answer_only=False)
    fast = patched(ref, scales=(9, 576), share_prefix=share_prefix)
    out = fast(**batch.inputs())
    torch.testing.assert_close(out.scale_losses, ref_scales, rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)


@SHARE
def test_adjacent_images_form_one_run(share_prefix):
    ref, batch, ref_loss, _ = released_step(2, ((4, IMG, IMG, 20), (30,)), scales=(1, 36, 576))
    fast = patched(ref, scales=(1, 36, 576), share_prefix=share_prefix)
    torch.testing.assert_close(fast(**batch.inputs()).loss, ref_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kv_heads", [1, 4])  # MQA and MHA (the default tiny model is GQA: 4 heads, 2 KV heads)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_shared_prefix_other_kv_heads(kv_heads, padding_side):
    rows = ((6, IMG, 12), (IMG, 9), (3, IMG, 2, IMG, 5))
    ref, batch, ref_loss, _ = released_step(18, rows, padding_side, scales=(1, 36, 576), kv_heads=kv_heads)
    fast = patched(ref, scales=(1, 36, 576))
    out = fast(**batch.inputs())
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)


def test_frozen_vision_tower_gets_no_grad():
    ref, fast = pair(seed=3)
    fast.model.vision_tower.requires_grad_(False)
    ref.model.vision_tower.requires_grad_(False)
    batch = make_batch(ref, [[8, IMG, 16]])
    released_m3_loss(ref, **batch.inputs(), scales=SCALES)[0].backward()
    fast(**batch.inputs()).loss.backward()
    assert all(p.grad is None for p in fast.model.vision_tower.parameters())
    assert_grads_match(ref, fast)


@SHARE
def test_gradient_checkpointing_recomputes_with_packing(share_prefix):
    ref, batch, ref_loss, _ = released_step(15, ((8, IMG, 16), (20,)), scales=(1, 36, 576))
    fast = patched(ref, scales=(1, 36, 576), share_prefix=share_prefix)
    fast.gradient_checkpointing_enable() if not hasattr(
        fast, "activation_checkpointing_enable"
    ) else fast.activation_checkpointing_enable()
    out = fast(**batch.inputs())
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)


@pytest.mark.parametrize("head", ["tied", "bias"])
def test_tied_embeddings_and_lm_head_bias(head):
    """The fused loss reads lm_head's weight (and bias) directly: a weight tied to the input embedding gets both
    uses' gradients, and a bias counts, as in the released loop."""
    ref = build(18).train()
    if head == "tied":
        ref.lm_head.weight = ref.model.language_model.embed_tokens.weight
    else:
        ref.lm_head = torch.nn.Linear(64, 384, bias=True)
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=(1, 9)).train()
    assert (fast.lm_head.weight is fast.model.language_model.embed_tokens.weight) == (head == "tied")
    batch = make_batch(ref, [[8, IMG, 16], [20]])
    ref_loss, ref_scales = released_m3_loss(ref, **batch.inputs(), scales=(1, 9))
    out = fast(**batch.inputs())
    torch.testing.assert_close(out.scale_losses, ref_scales.detach(), rtol=1e-5, atol=0)
    ref_loss.backward()
    out.loss.backward()
    assert_grads_match(ref, fast)


def test_error_lm_head_not_linear():
    _, fast = pair(seed=19, scales=(1, 576))
    fast.lm_head = torch.nn.Sequential(fast.lm_head)
    batch = make_batch(fast, [[6, IMG, 9]])
    with pytest.raises(ValueError, match="needs an nn.Linear, got Sequential"):
        fast(**batch.inputs())


def test_num_items_in_batch_sets_the_denominator():
    ref, fast = pair(seed=4, scales=(1, 576))
    batch = make_batch(ref, [[8, IMG, 16], [20]])
    n = int((batch.labels[:, 1:] != -100).sum())
    plain = fast(**batch.inputs()).scale_losses
    scaled = fast(**batch.inputs(), num_items_in_batch=3 * n).scale_losses
    torch.testing.assert_close(scaled * 3, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training(dtype):
    ref, _ = pair(seed=5)
    batch = make_batch(ref, MIXED_ROWS[:2])
    ref_loss, _ = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
    fast = fastnest.patch_llava(copy.deepcopy(ref).to(dtype)).train()
    out = fast(**batch.inputs())
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=2e-2, atol=0)
    out.loss.backward()
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    assert grads and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("scale", SCALES)
def test_inference_logits_and_generate_match_reference(scale):
    ref, fast = pair(seed=6)
    ref.eval(), fast.eval()
    batch = make_batch(ref, [[6, IMG, 9], [3, IMG, 4, IMG, 2], [11]], padding_side="left")
    rows, _, _ = scaled_rows(ref, **batch.inputs(labels=False), labels=None, scale=scale)
    with torch.no_grad():
        out = fast(**batch.inputs(labels=False), scale=scale)
        seen = fastnest.scaled_inputs(fast, **batch.inputs(labels=False), scale=scale)  # what the LM saw
        for b, emb in enumerate(rows):
            expected = ref.lm_head(ref.model.language_model(inputs_embeds=emb[None]).last_hidden_state)[0]
            got = out.logits[b][seen["attention_mask"][b].bool()]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        generated = fast.generate(**batch.inputs(labels=False), scale=scale, max_new_tokens=6, do_sample=False)
    width = batch.input_ids.shape[1]
    assert torch.equal(generated[:, :width], batch.input_ids)
    for b, emb in enumerate(rows):
        assert generated[b, width:].tolist() == reference_greedy(ref, emb, 6)


def test_eval_loss_uses_the_requested_scale():
    ref, fast = pair(seed=7)
    ref.eval(), fast.eval()
    batch = make_batch(ref, [[6, IMG, 19], [14]])
    with torch.no_grad():
        _, per_scale = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
        for i, scale in enumerate(SCALES):
            torch.testing.assert_close(fast(**batch.inputs(), scale=scale).loss, per_scale[i], rtol=1e-5, atol=0)


def test_vision_feature_layer_override_reaches_the_tower():
    ref, fast = pair(seed=16, scales=(1, 576))
    ref.eval(), fast.eval()
    batch = make_batch(ref, [[6, IMG, 9]])
    with torch.no_grad():
        ref.config.vision_feature_layer = -1  # (HF itself mishandles layer 0: it skips hidden states)
        expected = ref(**batch.inputs(labels=False)).logits
        got = fast(**batch.inputs(labels=False), vision_feature_layer=-1, scale=576).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_set_scale_is_the_default():
    _, fast = pair(seed=8)
    fast.eval()
    batch = make_batch(fast, [[6, IMG, 9]])
    with torch.no_grad():
        assert fast(**batch.inputs(labels=False)).logits.shape[1] == 6 + 576 + 9
        fastnest.set_scale(fast, 36)
        at_36 = fast(**batch.inputs(labels=False))
        assert at_36.logits.shape[1] == 6 + 36 + 9
        torch.testing.assert_close(at_36.logits, fast(**batch.inputs(labels=False), scale=36).logits)


def test_repatch_reconfigures_and_unpatch_restores():
    ref, fast = pair(seed=9)
    fastnest.patch_llava(fast, scales=(1, 576))
    batch = make_batch(ref, [[6, IMG, 9]])
    ref_loss, _ = released_m3_loss(ref, **batch.inputs(), scales=(1, 576))
    out = fast(**batch.inputs())
    assert out.scale_losses.shape == (2,)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    # the configs keep the user's implementation; the attention modules' forward routes packed calls
    attention = fast.model.language_model.layers[0].self_attn
    assert fast.config.text_config._attn_implementation == "sdpa"
    assert attention.config is fast.config.text_config and "forward" in attention.__dict__
    fastnest.unpatch(fast)
    assert fast.config.text_config._attn_implementation == "sdpa"
    assert "forward" not in attention.__dict__
    assert "forward" not in fast.__dict__ and not fastnest.hf.is_patched(fast)
    plain_ref, plain_fast = ref(**batch.inputs()), fast(**batch.inputs())
    torch.testing.assert_close(plain_fast.loss, plain_ref.loss)
    torch.testing.assert_close(plain_fast.logits, plain_ref.logits)


def test_deepcopy_of_patched_model_is_bound_to_the_copy():
    _, fast = pair(seed=10, scales=(1, 576))
    twin = copy.deepcopy(fast)
    assert twin.forward.__self__ is twin and twin.generate.__self__ is twin
    batch = make_batch(fast, [[6, IMG, 9]])
    torch.testing.assert_close(twin(**batch.inputs()).loss, fast(**batch.inputs()).loss)


# --- errors -----------------------------------------------------------------------------------------------


def test_error_scale_not_configured():
    _, fast = pair(seed=11, scales=(9, 576))
    fast.eval()
    batch = make_batch(fast, [[6, IMG, 9]])
    for call in (
        lambda: fast(**batch.inputs(labels=False), scale=36),
        lambda: fast.generate(**batch.inputs(labels=False), scale=36, max_new_tokens=1),
        lambda: fastnest.set_scale(fast, 36),
    ):
        with pytest.raises(ValueError, match=r"scale 36 .*\(9, 576\)"):
            call()


@pytest.mark.parametrize("scales", [(1, 25, 576), (10,), (1, 1)])
def test_error_scale_set_does_not_divide_grid(scales):
    with pytest.raises(ValueError, match="scale"):
        fastnest.patch_llava(build(), scales=scales)


def test_error_bad_scale_message_lists_allowed():
    with pytest.raises(ValueError, match=r"scale 25 .*allowed scales: \(1, 4, 9, 16, 36, 64, 144, 576\)"):
        fastnest.patch_llava(build(), scales=(1, 25))


def test_error_image_count_mismatch():
    _, fast = pair(seed=12)
    batch = make_batch(fast, [[6, IMG, 9], [4, IMG, 3]])
    inputs = batch.inputs() | {"pixel_values": batch.pixel_values[:1]}
    with pytest.raises(ValueError, match="2 image placeholder blocks .* 1 images"):
        fast(**inputs)


def test_error_placeholder_run_length():
    _, fast = pair(seed=13)
    batch = make_batch(fast, [[6, IMG, 9]])
    batch.input_ids[0, 6] = 5  # the image's first placeholder becomes text: a run of 575
    with pytest.raises(ValueError, match=r"run of 575 image placeholder tokens .* exactly 576"):
        fast(**batch.inputs())


def test_error_labels_on_placeholders():
    _, fast = pair(seed=14)
    batch = make_batch(fast, [[6, IMG, 9]])
    batch.labels[0, 10] = 3
    with pytest.raises(ValueError, match="image placeholder positions"):
        fast(**batch.inputs())


def test_error_patch_wrong_model_type():
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        fastnest.patch_llava(torch.nn.Linear(2, 2))


@SHARE
def test_one_vision_pass_one_packed_lm_pass_logits_only_at_labels(monkeypatch, share_prefix):
    _, fast = pair(seed=17)
    fastnest.patch_llava(fast, share_prefix=share_prefix)
    rows = [[35, IMG, 40], [60], [10, IMG, 7, IMG, 25], [IMG, 12]]
    batch = make_batch(fast, rows)
    calls = {"vision": [], "lm": [], "head": [], "dense_masks": 0, "varlen_infos": 0}
    from_packed = fastnest.VarlenInfo.from_packed.__func__

    def counting_info(cls, *args, **kwargs):
        calls["varlen_infos"] += 1
        return from_packed(cls, *args, **kwargs)

    monkeypatch.setattr(fastnest.VarlenInfo, "from_packed", classmethod(counting_info))
    fast.model.vision_tower.register_forward_hook(lambda m, args, out: calls["vision"].append(args[0].shape[0]))
    fast.model.language_model.register_forward_hook(
        lambda m, args, kwargs, out: calls["lm"].append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    fast.lm_head.register_forward_hook(lambda m, args, out: calls["head"].append(args[0].shape))
    calls["loss"] = []
    fused = fastnest.step.fused_linear_cross_entropy

    def spy_loss(hidden, weight, *args, **kwargs):
        calls["loss"].append((hidden.shape, weight is fast.lm_head.weight))
        return fused(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(fastnest.step, "fused_linear_cross_entropy", spy_loss)

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def counting_mask(**kwargs):
        calls["dense_masks"] += 1
        return sdpa_mask(**kwargs)

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", counting_mask)
    fast(**batch.inputs()).loss.backward()

    n_scales, per_image = len(SCALES), sum(SCALES)
    image_rows = [r for r in rows if IMG in r]
    text_tokens = {id(r): sum(s for s in r if s != IMG) for r in rows}
    expected_len = sum(
        n_scales * text_tokens[id(r)] + per_image * r.count(IMG) if IMG in r else text_tokens[id(r)] for r in rows
    )
    if share_prefix:  # each image row's text before its first image is packed once, not once per scale
        expected_len -= (n_scales - 1) * sum(r[0] for r in image_rows if r[0] != IMG)
    # make_batch labels each row's last text segment; a row's very first token has no logit predicting it
    expected_logits = sum(n_scales * r[-1] if IMG in r else r[-1] - 1 for r in rows)
    assert calls["vision"] == [sum(r.count(IMG) for r in image_rows)]  # every image through the tower, once
    assert calls["lm"] == [torch.Size([1, expected_len, 64])]  # one packed sequence, no padding
    # the loss sees hidden states only where there are labels, with lm_head's weight; lm_head's forward (full
    # logits) never runs in training
    assert calls["loss"] == [(torch.Size([expected_logits, 64]), True)]
    assert calls["head"] == []
    assert calls["dense_masks"] == 0
    assert calls["varlen_infos"] == 1  # the packing reaches the attention layers built once per step
    fast.eval()
    with torch.no_grad():
        fast(**batch.inputs(labels=False))
    assert calls["dense_masks"] > 0  # the spy does see the inference path's masks


def test_registry_dispatches_on_model_type():
    model = fastnest.patch(build(), scales=(1, 576))
    assert fastnest.patch_state(model).spec.scales == (1, 576)
    assert fastnest.PATCHES["llava"] is fastnest.patch_llava
    with pytest.raises(ValueError, match=r"model_type 'llama'.*\['llava', 'llava_next', 'mqt_llava'\]"):
        fastnest.patch(model.model.language_model)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_projector_kernels_in_the_training_step(backend, monkeypatch):
    """patch_llava runs LLaVA's projector through the fused kernels (Triton's interpreter here); same loss/grads."""
    calls = []
    original = fastnest.ops.projector.function._ProjectPool.apply
    monkeypatch.setattr(
        fastnest.ops.projector.function._ProjectPool, "apply", lambda *a: calls.append(a) or original(*a)
    )
    ref = build(seed=4).train()
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, backend=backend).train()
    batch = make_batch(ref, [[6, IMG, 12], [9, IMG, 4]])
    ref_loss, _ = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
    out = fast(**batch.inputs())
    assert len(calls) == (backend == "triton")
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    ref_loss.backward()
    out.loss.backward()
    assert_grads_match(ref, fast)


def test_unknown_backend_is_rejected_at_patch_time():
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        fastnest.patch_llava(build(), backend="cuda")


# --- attention backends -----------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()


def test_error_attention_checked_when_patching():
    model = build()
    with pytest.raises(ValueError, match=r"attention 'flash3' is not one of \('auto', 'flash', 'xformers'"):
        fastnest.patch_llava(model, attention="flash3")
    assert not fastnest.hf.is_patched(model)  # nothing was patched
    for backend, package in (("flash", "flash_attn"), ("xformers", "xformers")):
        if CUDA and importlib.util.find_spec(package) is not None:
            continue  # available here
        with pytest.raises(ValueError, match=rf"attention '{backend}' is unavailable: .*{package}"):
            fastnest.patch_llava(model, attention=backend)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_explicit_sdpa_and_flex_forward_on_cpu():
    ref, batch, ref_loss, _ = released_step(2, ((4, IMG, IMG, 20), (30,)), scales=(1, 36, 576))
    sdpa = patched(ref, scales=(1, 36, 576), attention="sdpa")
    torch.testing.assert_close(sdpa(**batch.inputs()).loss, ref_loss, rtol=1e-5, atol=0)
    flex = patched(ref, scales=(1, 36, 576), attention="flex")
    with pytest.raises(ValueError, match="FlexAttention's backward needs CUDA"):
        flex(**batch.inputs())  # a training step needs the backward, which FlexAttention has only on CUDA
    with torch.no_grad():
        torch.testing.assert_close(flex(**batch.inputs()).loss, ref_loss, rtol=1e-5, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@SHARE
@pytest.mark.parametrize("attention", ["flash", "xformers", "flex", "sdpa"])
def test_cuda_backends_match_released_loop(attention, share_prefix, monkeypatch):
    try:
        fastnest.dispatch.check_backend("attention", attention)
    except ValueError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the vision tower's patch convolution
    ref, batch, ref_loss, ref_scales = released_step(0, MIXED_ROWS)
    dtype = torch.bfloat16 if attention == "flash" else torch.float32  # FlashAttention: half precision only
    fast = patched(ref, attention=attention, share_prefix=share_prefix).to("cuda", dtype)
    out = fast(**{k: v.cuda() for k, v in batch.inputs().items()})
    assert out.loss.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.scale_losses.cpu(), ref_scales, rtol=tol, atol=0)
    out.loss.backward()
    if dtype == torch.float32:
        assert_grads_match(ref, fast.cpu(), rtol=1e-3)
    else:
        assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
