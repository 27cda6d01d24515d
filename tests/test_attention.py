"""varlen_attention against explicit per-sequence causal softmax attention in float64."""

import math

import pytest
import torch

from fastnest.attention import VarlenInfo, varlen_attention


def info_for(seqlens):
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
    return VarlenInfo.from_seqlens(cu, tuple(seqlens), torch.device("cpu"))


def reference_attention(q, k, v, seqlens, scale=None):
    """Plain loops: for each sequence and head, softmax(Q K^T * scale + causal mask) V, in float64.

    q [1, H, T, d], k/v [1, Hkv, T, d]; query head h uses kv head h // (H // Hkv). Returns [1, T, H, d].
    """
    _, h, t, d = q.shape
    hkv = k.shape[1]
    assert h % hkv == 0
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = q.new_zeros(t, h, d)
    start = 0
    for n in seqlens:
        for head in range(h if n else 0):
            kv = head // (h // hkv)
            qs = q[0, head, start : start + n]
            ks = k[0, kv, start : start + n]
            vs = v[0, kv, start : start + n]
            scores = qs @ ks.T * scale
            causal = torch.arange(n)[:, None] >= torch.arange(n)[None, :]  # key j <= query i
            scores = torch.where(causal, scores, float("-inf"))
            p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            out[start : start + n, head] = (p / p.sum(dim=-1, keepdim=True)) @ vs
        start += n
    return out.unsqueeze(0)


def make_qkv(t, h, hkv, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, t, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(1, hkv, t, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(1, hkv, t, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


SEQLENS = [(7,), (3, 5), (4, 0, 6), (1, 1, 1), (0, 5), (5, 0), (2, 6, 1, 3)]
HEADS = [(4, 4), (4, 2), (6, 1), (2, 1)]  # (H, Hkv): MHA, GQA, MQA


def test_info_from_seqlens():
    info = info_for((3, 0, 5))
    assert info.cu_seqlens.tolist() == [0, 3, 3, 8]
    assert info.cu_seqlens.dtype == torch.int32
    assert info.seqlens == (3, 0, 5)
    assert info.max_seqlen == 5
    assert info_for(()).max_seqlen == 0


@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("h, hkv", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward(seqlens, h, hkv, dtype):
    d = 8
    q, k, v = make_qkv(sum(seqlens), h, hkv, d, seed=sum(seqlens) + h, dtype=dtype)
    out = varlen_attention(q, k, v, info_for(seqlens))
    assert out.shape == (1, sum(seqlens), h, d)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, seqlens), rtol=tol, atol=tol)


@pytest.mark.parametrize("scale", [0.1, 1.0, 0.7])
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2)])
def test_explicit_scale(scale, h, hkv):
    seqlens = (3, 0, 5)
    q, k, v = make_qkv(8, h, hkv, 16, seed=2)
    out = varlen_attention(q, k, v, info_for(seqlens), scale=scale)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, seqlens, scale), rtol=1e-5, atol=1e-5)
    # the default scale (1/sqrt(16) = 0.25) is a different function
    assert not torch.allclose(out, varlen_attention(q, k, v, info_for(seqlens)), atol=1e-3)


@pytest.mark.parametrize("seqlens", [(3, 5), (4, 0, 6), (2, 6, 1, 3), (0, 4, 0)])
@pytest.mark.parametrize("h, hkv", HEADS)
def test_backward(seqlens, h, hkv):
    d, t = 8, sum(seqlens)
    q, k, v = make_qkv(t, h, hkv, d, seed=7 * t + hkv)
    w = torch.randn(1, t, h, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    got = [x.clone().requires_grad_(True) for x in (q, k, v)]
    (varlen_attention(*got, info_for(seqlens), scale=0.3).double() * w).sum().backward()
    want = [x.double().requires_grad_(True) for x in (q, k, v)]
    (reference_attention(*want, seqlens, scale=0.3) * w).sum().backward()
    for name, a, b in zip("qkv", got, want):
        assert a.grad.dtype == torch.float32, name
        assert a.grad.shape == b.shape, name
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_causal_first_token_sees_only_itself():
    # the first token of every sequence attends only to itself: its output is its own value row
    seqlens = (3, 4, 2)
    q, k, v = make_qkv(9, 2, 2, 4, seed=3)
    out = varlen_attention(q, k, v, info_for(seqlens))
    for start in (0, 3, 7):
        torch.testing.assert_close(out[0, start], v[0, :, start])


def _run(q, k, v, seqlens, w):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = varlen_attention(*leaves, info_for(seqlens))
    (out * w).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("seqlens", [(4, 5, 3), (4, 0, 5, 3)])
def test_no_leakage_between_sequences(h, hkv, seqlens):
    """Perturbing one sequence's q/k/v leaves every other sequence's outputs and input gradients unchanged."""
    t, d = sum(seqlens), 8
    q, k, v = make_qkv(t, h, hkv, d, seed=11)
    w = torch.randn(1, t, h, d, generator=torch.Generator().manual_seed(4))
    base_out, base_grads = _run(q, k, v, seqlens, w)
    bounds = torch.tensor((0, *seqlens)).cumsum(0).tolist()
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        span = slice(bounds[i], bounds[i + 1])
        g = torch.Generator().manual_seed(100 + i)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, span] += 5 * torch.randn(x[:, :, span].shape, generator=g)
        out, grads = _run(q2, k2, v2, seqlens, w)
        # the perturbed sequence itself does change (the test can see a difference)
        assert not torch.allclose(out[:, span], base_out[:, span], atol=1e-3)
        for j, m in enumerate(seqlens):
            if j == i or m == 0:
                continue
            other = slice(bounds[j], bounds[j + 1])
            torch.testing.assert_close(out[:, other], base_out[:, other], rtol=1e-6, atol=1e-6)
            for name, a, b in zip("qkv", grads, base_grads):
                torch.testing.assert_close(a[:, :, other], b[:, :, other], rtol=1e-6, atol=1e-6, msg=f"grad {name}")


def test_empty_sequence_in_middle_matches_no_empty():
    q, k, v = make_qkv(9, 4, 2, 8, seed=5)
    a = varlen_attention(q, k, v, info_for((4, 0, 5)))
    b = varlen_attention(q, k, v, info_for((4, 5)))
    torch.testing.assert_close(a, b)
