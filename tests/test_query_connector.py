"""MatryoshkaQueryTransformer against the released connector restated plainly (tools/mqt_reference.py:
explicit matmuls and softmax, one m at a time), the nesting property in both key modes, dtypes and errors."""

from __future__ import annotations

import pytest
import torch

from fastnest import MatryoshkaQueryTransformer
from tools.mqt_reference import released_connector

DV, DOUT, M, HEADS, GRID = 32, 24, 16, 4, 6


def build(keys="positional", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    mqt = MatryoshkaQueryTransformer(DV, DOUT, num_queries=M, num_heads=HEADS, grid=GRID, keys=keys)
    with torch.no_grad():  # non-trivial norms and biases, so that a mix-up of q/k/v shows
        for p in (mqt.ln_q, mqt.ln_k, mqt.ln_v, mqt.attn.out_proj):
            p.weight.add_(0.3 * torch.randn_like(p.weight))
            p.bias.normal_(0, 0.2)
        mqt.attn.in_proj_bias.normal_(0, 0.2)
        mqt.pos_embed.add_(0.1 * torch.randn_like(mqt.pos_embed))  # a trained table, not the formula
    return mqt.to(dtype)


def reference(mqt, features, m, keys="positional"):
    return released_connector(mqt, features, m, keys)


def features(n=3, seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.randn(n, GRID * GRID, DV, dtype=dtype)


@pytest.mark.parametrize("keys", ["positional", "features"])
@pytest.mark.parametrize("m", [1, 2, 7, M])
def test_equals_reference_outputs_and_gradients(keys, m):
    mqt = build(keys)
    x = features().requires_grad_(True)
    out = mqt(x, m)
    assert out.shape == (3, m, DOUT)
    ref_model = build(keys)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference(ref_model, x_ref, m, keys)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    refs = dict(ref_model.named_parameters())
    for name, p in mqt.named_parameters():
        torch.testing.assert_close(p.grad, refs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("keys", ["positional", "features"])
def test_nested_first_m_of_M_are_the_m_query_outputs(keys):
    mqt = build(keys)
    x = features()
    full = mqt(x)
    assert full.shape == (3, M, DOUT)
    for m in range(1, M + 1):
        torch.testing.assert_close(full[:, :m], mqt(x, m), rtol=1e-6, atol=1e-6)


def test_positional_keys_ignore_the_image_features_keys_do_not():
    """Released keys: the attention weights are a fixed pooling, so the output is linear in LN(features)."""
    x = features()
    y = x.clone()
    y[0] = 3 * x[1] + 0.5  # same LayerNorm of every row as x[1]: same values
    for keys, same in (("positional", True), ("features", False)):
        out = build(keys)(y)
        assert torch.allclose(out[0], out[1], atol=1e-5) == same, keys


def test_release_parameter_names_and_shapes():
    mqt = MatryoshkaQueryTransformer(1024, 4096)
    shapes = {k: tuple(v.shape) for k, v in mqt.state_dict().items()}
    assert shapes == {
        "query": (256, 1024),
        "pos_embed": (256, 1024),
        "attn.in_proj_weight": (3072, 1024),
        "attn.in_proj_bias": (3072,),
        "attn.out_proj.weight": (1024, 1024),
        "attn.out_proj.bias": (1024,),
        "ln_q.weight": (1024,),
        "ln_q.bias": (1024,),
        "ln_k.weight": (1024,),
        "ln_k.bias": (1024,),
        "ln_v.weight": (1024,),
        "ln_v.bias": (1024,),
        "proj": (1024, 4096),
    }
    assert mqt.ln_q.eps == mqt.ln_k.eps == mqt.ln_v.eps == 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_runs_in_each_dtype_with_an_fp16_table(dtype):
    """The release stores pos_embed in fp16, which broke its fp32 forward: any stored dtype works here."""
    ref = build()
    mqt = build().to(dtype)
    mqt.pos_embed.data = mqt.pos_embed.data.half()
    x = features()
    out = mqt(x.to(dtype), 5)
    assert out.dtype == dtype
    tol = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.float(), reference(ref, x, 5), rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [0, M + 1, -1, 2.0, True, "4"])
def test_token_count_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=rf"num_tokens must be an int in 1\.\.{M}.*{bad!r}"):
        build()(features(), bad)


@pytest.mark.parametrize("shape", [(3, GRID * GRID + 1, DV), (3, GRID * GRID, DV + 1), (GRID * GRID, DV)])
def test_wrong_feature_shape_is_refused(shape):
    with pytest.raises(ValueError, match=r"features must be \[N, 36, 32\].*got"):
        build()(torch.randn(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_queries": 10}, "perfect square.*10"),
        ({"num_heads": 5}, "num_heads.*dividing vision_dim=32.*5"),
        ({"keys": "image"}, "keys must be one of.*'image'"),
        ({"grid": 0}, "grid must be a positive int.*0"),
    ],
)
def test_bad_construction_is_refused(kwargs, match):
    options = {"num_queries": M, "num_heads": HEADS, "grid": GRID, **kwargs}
    with pytest.raises(ValueError, match=match):
        MatryoshkaQueryTransformer(DV, DOUT, **options)
