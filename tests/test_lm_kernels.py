"""``lm_kernels`` of the patch: the language model's fused RMSNorm / SwiGLU / rotary in the packed training pass.

Native (CPU) and Liger (CUDA) against the released loop (tools/m3_reference.py) and the unfused patched model;
the choice's checks and errors; the instance-only patching."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import fastnest
import fastnest.hf.lm_kernels as lm_kernels
from fastnest.dispatch import native_available
from fastnest.hf.tiny import tiny_llava
from tools.batches import IMG, make_batch
from tools.compare import assert_grads_match
from tools.m3_reference import released_m3_loss

SCALES = (1, 9, 36, 144, 576)
ROWS = ([35, IMG, 40], [5, IMG, 120], [60], [IMG, 30])
NATIVE = pytest.mark.skipif(not native_available(), reason="the native extension fastnest._C is not built")
LIGER_MISSING = (
    "liger-kernel is not installed"
    if importlib.util.find_spec("liger_kernel") is None
    else "Liger-Kernel's RMSNorm and SwiGLU Triton kernels need CUDA (they fail under TRITON_INTERPRET=1 on CPU)"
    if not torch.cuda.is_available()
    else None
)


def build(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return tiny_llava(grid=24, vision_hidden=32, vision_layers=2, hidden=64, layers=2, heads=4, vocab=384, **kw).train()


def fused_calls(monkeypatch) -> list[str]:
    """The kernels every fused layer call ran with (a spy on the module's fused forward)."""
    seen, fused = [], lm_kernels._fused_forward

    def spy(layer, hidden, cos, sin, info, ops, **reads):
        seen.append(ops)
        return fused(layer, hidden, cos, sin, info, ops, **reads)

    monkeypatch.setattr(lm_kernels, "_fused_forward", spy)
    return seen


@NATIVE
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "unshared"])
def test_native_matches_released_loop(kv_heads, share_prefix, monkeypatch):
    ref = build(kv_heads=kv_heads)
    batch = make_batch(ref, [list(r) for r in ROWS])
    ref_loss, ref_scales = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
    ref_loss.backward()
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, share_prefix=share_prefix, lm_kernels="native")
    fast.zero_grad(set_to_none=True)
    seen = fused_calls(monkeypatch)
    out = fast(**batch.inputs())
    assert len(seen) == 2  # both decoder layers ran fused
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.scale_losses, ref_scales.detach(), rtol=1e-5, atol=0)
    out.loss.backward()
    assert_grads_match(ref, fast)


@NATIVE
def test_the_last_layer_runs_past_its_attention_only_at_the_labelled_positions(monkeypatch):
    ref = build()
    batch = make_batch(ref, [list(r) for r in ROWS[:2]])
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels="native")
    layers = fast.model.language_model.layers
    seen, queries, attend = {}, [], lm_kernels.varlen_attention

    def rows_in(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape[0])  # the first (forward) call's input rows

        return hook

    def spy(q, k, v, info, **kw):
        queries.append((q.shape[0], k.shape[0]))
        return attend(q, k, v, info, **kw)

    monkeypatch.setattr(lm_kernels, "varlen_attention", spy)
    hooks = [
        module.register_forward_pre_hook(rows_in(name))
        for name, module in (
            ("first v_proj", layers[0].self_attn.v_proj),
            ("first down_proj", layers[0].mlp.down_proj),
            ("last v_proj", layers[-1].self_attn.v_proj),
            ("last down_proj", layers[-1].mlp.down_proj),
        )
    ]
    out = fast(**batch.inputs())
    for hook in hooks:
        hook.remove()
    labels, lengths = batch.inputs()["labels"], batch.inputs()["attention_mask"].sum(1).tolist()
    targets = int((labels[:, 1:] != -100).sum()) * len(SCALES)  # each target at every scale
    packed = seen["first v_proj"]
    assert seen["first down_proj"] == seen["last v_proj"] == packed  # keys and values at every position
    assert seen["last down_proj"] == targets < packed
    # the last layer's queries: each (row, scale) sequence from the position before its first label to its end
    # (the rows' text before the image is shared, and labels come after the image)
    tails = sum(n - int((row != -100).nonzero()[0]) + 1 for n, row in zip(lengths, labels)) * len(SCALES)
    assert queries == [(packed, packed), (tails, packed)] and targets < tails < packed
    unfused = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels="torch")
    torch.testing.assert_close(out.loss, unfused(**batch.inputs()).loss, rtol=1e-5, atol=0)


@NATIVE
def test_auto_is_native_on_cpu_and_torch_runs_the_model_code(monkeypatch):
    ref = build()
    batch = make_batch(ref, [list(r) for r in ROWS[:2]])
    seen = fused_calls(monkeypatch)
    losses = {}
    for choice in ("auto", "torch"):
        model = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels=choice)
        losses[choice] = model(**batch.inputs()).loss.detach()
        assert fastnest.patch_state(model).lm_kernels == choice
    assert len(seen) == 2  # auto's two layers; torch none
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=1e-5, atol=0)


@NATIVE
def test_gradient_checkpointing_recomputes_fused_layers(monkeypatch):
    ref = build()
    batch = make_batch(ref, [list(r) for r in ROWS[:2]])
    plain = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels="native")
    plain(**batch.inputs()).loss.backward()
    ckpt = copy.deepcopy(ref)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = fastnest.patch_llava(ckpt, scales=SCALES, lm_kernels="native")
    seen = fused_calls(monkeypatch)
    ckpt(**batch.inputs()).loss.backward()
    assert len(seen) == 4  # forward, then each layer recomputed in the backward
    assert_grads_match(plain, ckpt, rtol=1e-6)


@NATIVE
def test_half_precision_under_autocast():
    ref = build(seed=3)
    batch = make_batch(ref, [list(r) for r in ROWS[:2]])
    ref_loss, _ = released_m3_loss(ref, **batch.inputs(), scales=SCALES)
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels="native")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(**batch.inputs())
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=2e-2, atol=0)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


def test_patching_is_per_instance_and_unpatch_restores():
    ref = build()
    cls = type(ref.model.language_model.layers[0])
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES)
    layers = fast.model.language_model.layers
    assert all("forward" in layer.__dict__ for layer in layers)
    assert cls.forward is type(layers[0]).forward and "forward" not in ref.model.language_model.layers[0].__dict__
    fastnest.unpatch(fast)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_errors_name_the_choice_and_why():
    with pytest.raises(ValueError, match=r"lm_kernels 'fused' is not one of \('auto', 'liger', 'native', 'torch'\)"):
        fastnest.patch_llava(build(), lm_kernels="fused")
    other = build()
    other.model.language_model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="lm_kernels 'native' is unavailable: the MLP's activation is 'gelu'"):
        fastnest.patch_llava(other, lm_kernels="native")
    assert fastnest.patch_state(fastnest.patch_llava(other)).lm_kernels == "auto"  # auto: the model's own code there
    assert lm_kernels.resolve(other.model.language_model, "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="lm_kernels 'native' cannot run here: it runs on cpu tensors, got meta"):
        lm_kernels.resolve(build().model.language_model, "native", torch.device("meta"))


@pytest.mark.skipif(LIGER_MISSING is None, reason="this process can run Liger-Kernel")
def test_liger_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="lm_kernels 'liger' is unavailable: "):
        fastnest.patch_llava(build(), lm_kernels="liger")


@pytest.mark.skipif(LIGER_MISSING is not None, reason=LIGER_MISSING or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_matches_unfused_on_cuda(dtype, monkeypatch):
    ref = build().cuda().to(dtype)
    batch = make_batch(ref, [list(r) for r in ROWS])
    inputs = {k: v.cuda() for k, v in batch.inputs().items()}
    models = {k: fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, lm_kernels=k) for k in ("torch", "liger")}
    seen = fused_calls(monkeypatch)
    losses = {}
    for name, model in models.items():
        losses[name] = model(**inputs).loss
        losses[name].backward()
    assert len(seen) == 2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(losses["liger"], losses["torch"], rtol=tol, atol=0)
    if dtype == torch.float32:
        assert_grads_match(models["torch"], models["liger"])
