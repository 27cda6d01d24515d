"""matryoshka_project's dispatch, projector recognition and MatryoshkaProjector (the kernels have their own tests)."""

import pytest
import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.activations import ACT2FN
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from fastnest import dispatch
from fastnest.connectors import MatryoshkaProjector
from fastnest.ops.projector.function import _ProjectPool, fusable_parts, matryoshka_project
from fastnest.ops.projector.naive import reference_pool, reference_project


def mlp(k=12, h=20, d=16, act=None, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(k, h, bias=bias), act or nn.GELU(), nn.Linear(h, d, bias=bias))


def features(n=2, grid=24, k=12, seed=1):
    return torch.randn(n, grid * grid, k, generator=torch.Generator().manual_seed(seed))


def llava_projector(act: str) -> LlavaMultiModalProjector:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=12, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2),
        projector_hidden_act=act,
    )
    return LlavaMultiModalProjector(config)


@pytest.mark.parametrize(
    "act, approximate", [("gelu", "none"), ("gelu_pytorch_tanh", "tanh"), ("gelu_new", "tanh"), ("gelu_python", "none")]
)
def test_llava_projector_is_fused(act, approximate):
    proj = llava_projector(act)
    assert fusable_parts(proj) == (proj.linear_1, approximate, proj.linear_2)


@pytest.mark.parametrize("act", ["quick_gelu", "silu", "relu", "gelu_fast"])
def test_other_activations_are_not_fused(act):
    assert fusable_parts(llava_projector(act)) is None
    assert fusable_parts(mlp(act=ACT2FN[act])) is None


def test_nn_gelu_sequential_is_fused():
    proj = mlp(act=nn.GELU(approximate="tanh"))
    assert fusable_parts(proj) == (proj[0], "tanh", proj[2])
    assert fusable_parts(nn.Sequential(*proj, nn.Identity())) is None


def test_hooks_or_wrapped_forward_disable_fusion():
    proj = mlp()
    handle = proj[2].register_forward_hook(lambda m, i, o: o * 2)
    assert fusable_parts(proj) is None
    handle.remove()
    assert fusable_parts(proj) is not None
    proj[0].forward = lambda x: x  # e.g. accelerate's device hooks replace the instance's forward
    assert fusable_parts(proj) is None


def test_linear_subclass_is_not_fused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    proj = mlp()
    proj[2] = Scaled(20, 16)
    assert fusable_parts(proj) is None


def fused_calls(monkeypatch) -> list:
    calls = []
    original = _ProjectPool.apply
    monkeypatch.setattr(_ProjectPool, "apply", lambda *a: calls.append(a) or original(*a))
    return calls


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backends_agree_with_reference(backend, monkeypatch):
    calls = fused_calls(monkeypatch)
    proj, x = mlp(), features()
    out = matryoshka_project(x, proj, (576, 36, 1), backend=backend)
    assert len(calls) == (backend != "torch")
    ref = reference_project(x, proj[0].weight, proj[0].bias, proj[2].weight, proj[2].bias, "none", 24, (576, 36, 1))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_unrecognised_projector_is_run_then_pooled_by_the_backend(monkeypatch):
    calls = fused_calls(monkeypatch)
    proj = mlp(act=nn.SiLU())
    x = features().requires_grad_(True)
    out = matryoshka_project(x, proj, (9, 144), backend="triton")
    assert not calls
    x_ref = x.detach().double().requires_grad_(True)
    ref = reference_pool(proj.double()(x_ref), 24, (9, 144))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_autocast_runs_the_fused_kernels_in_the_autocast_dtype():
    proj, x = mlp(), features(n=1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = matryoshka_project(x, proj, (144, 1), backend="triton")
        want = matryoshka_project(x, proj, (144, 1), backend="torch")  # nn.Linear under autocast
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and proj[0].weight.grad.dtype == torch.float32


def test_dtype_mismatch_is_an_error():
    with pytest.raises(ValueError, match="bfloat16.*float32|float32.*bfloat16"):
        matryoshka_project(features().bfloat16(), mlp(), (1,), backend="triton")


def test_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="'cuda' is not one of"):
        matryoshka_project(features(), mlp(), (1,), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="'triton' is unavailable: Triton kernels need CUDA tensors"):
        matryoshka_project(features(), mlp(), (1,), backend="triton")


def test_auto_backend_on_cpu():
    expected = "native" if dispatch.native_available() else "torch"
    assert (
        dispatch.resolve_backend("projector", "cpu") == dispatch.resolve_backend("projector", "cpu", "auto") == expected
    )


def test_matryoshka_projector_module():
    proj = mlp()
    module = MatryoshkaProjector(proj, grid=24, scales=(1, 9, 576), backend="triton")
    assert list(module.state_dict()) == [f"projector.{k}" for k in proj.state_dict()]
    assert "scales=(1, 9, 576)" in repr(module) and "backend=triton" in repr(module)
    x = features()
    torch.testing.assert_close(module(x), matryoshka_project(x, proj, (1, 9, 576), backend="torch"))
    with pytest.raises(ValueError, match="scale 7"):
        MatryoshkaProjector(proj, grid=24, scales=(7,))


def test_inference_keeps_no_pre_activation(monkeypatch):
    from fastnest.ops.projector import triton as projector_triton

    kept = []
    original = projector_triton.linear_gelu
    monkeypatch.setattr(projector_triton, "linear_gelu", lambda *a: kept.append(a[-1]) or original(*a))
    proj, x = mlp(), features(n=1)
    with torch.no_grad():
        matryoshka_project(x, proj, (9,), backend="triton")
    matryoshka_project(x, proj, (9,), backend="triton")  # parameters require grad
    assert kept == [False, True]
