"""varlen_attention, every backend, against explicit per-sequence causal softmax attention in float64.

sdpa and native run forward and backward on CPU (native where fastnest._C is built), flex its forward on CPU; flash, xformers and flex's backward need CUDA
(and the packages) and are skipped without them.
"""

import importlib.machinery
import importlib.util
import warnings

import pytest
import torch

from fastnest import dispatch
from fastnest.attention import BACKENDS, VarlenInfo, varlen_attention
from fastnest.attention.naive import reference_attention
from fastnest.dispatch import check_backend, resolve_backend

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make_qkv(t, h, hkv, d, seed, dtype=torch.float32, device="cpu"):
    """Tokens-major ``[T, H, d]`` query and ``[T, Hkv, d]`` key and value."""
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(t, heads, d, generator=g, dtype=torch.float64).to(device, dtype) for heads in (h, hkv, hkv)
    )


# (seqlens, context): plain packing, then shared prefixes (a context is an earlier sequence)
CASES = [
    ((7,), None),
    ((3, 5), None),
    ((4, 0, 6), None),
    ((0, 5), None),
    ((5, 0), None),
    ((2, 6, 1, 3), None),
    ((3, 4, 5), (-1, 0, 0)),
    ((3, 0, 5, 2, 1, 4), (-1, 0, 0, -1, 3, 3)),  # an empty continuation
    ((0, 3, 2), (-1, 0, -1)),  # an empty context
    ((6, 1, 9, 2, 2, 3), (-1, 0, 0, -1, -1, 4)),  # one-token continuation; a prefix read by one sequence
]
HEADS = [(4, 4), (4, 2), (6, 1)]  # (H, Hkv): MHA, GQA, MQA
# per backend: (device, dtype, tolerance against float64)
SETUPS = {
    "sdpa": [("cpu", torch.float32, 1e-5), ("cpu", torch.float64, 1e-10)],
    "native": [("cpu", torch.float32, 1e-5)],
    "flex": [("cpu", torch.float32, 1e-5), ("cuda", torch.float32, 2e-3)],
    "xformers": [("cuda", torch.float32, 2e-3), ("cuda", torch.bfloat16, 3e-2)],
    "flash": [("cuda", torch.bfloat16, 3e-2), ("cuda", torch.float16, 5e-3)],
}
PARAMS = [pytest.param(b, dev, dt, tol, id=f"{b}-{dev}-{str(dt)[6:]}") for b in BACKENDS for dev, dt, tol in SETUPS[b]]


def backend_or_skip(backend, device, dtype, backward):
    if torch.device(device).type == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    try:
        return resolve_backend("attention", device, backend, dtype=dtype, backward=backward)
    except ValueError as e:  # a package missing on this CUDA machine
        pytest.skip(str(e))


def info_for(seqlens, context=None, backend="sdpa", device="cpu", context_lens=None):
    return VarlenInfo.from_seqlens(seqlens, context, device=device, backend=backend, context_lens=context_lens)


# (seqlens, context, context_lens): continuations reading the first n tokens of their context (nested prefixes)
PARTIAL = [
    ((6, 2, 3, 4), (-1, 0, 0, 0), (0, 6, 1, 4)),
    ((5, 3, 0, 4, 2), (-1, 0, 0, -1, 3), (0, 1, 4, 0, 3)),
]


@pytest.mark.parametrize("backend, device, dtype, tol", PARAMS)
@pytest.mark.parametrize("seqlens, context", CASES)
@pytest.mark.parametrize("h, hkv", HEADS)
def test_forward(backend, device, dtype, tol, seqlens, context, h, hkv):
    backend_or_skip(backend, device, dtype, backward=False)
    d = 16
    q, k, v = make_qkv(sum(seqlens), h, hkv, d, seed=sum(seqlens) + h, dtype=dtype, device=device)
    with torch.no_grad():
        out = varlen_attention(q, k, v, info_for(seqlens, context, backend, device))
    assert out.shape == (sum(seqlens), h, d)
    assert out.dtype == dtype and out.device.type == torch.device(device).type
    want = reference_attention(q.cpu(), k.cpu(), v.cpu(), seqlens, context)
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


BACKWARD = [p for p in PARAMS if not (p.values[0] == "flex" and p.values[1] == "cpu")]


@pytest.mark.parametrize("backend, device, dtype, tol", BACKWARD)
@pytest.mark.parametrize("seqlens, context", [c for c in CASES if sum(c[0]) > 0][2:])
@pytest.mark.parametrize("h, hkv", HEADS)
def test_backward(backend, device, dtype, tol, seqlens, context, h, hkv):
    backend_or_skip(backend, device, dtype, backward=True)
    d, t = 16, sum(seqlens)
    q, k, v = make_qkv(t, h, hkv, d, seed=7 * t + hkv, dtype=dtype, device=device)
    w = torch.randn(t, h, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    got = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = varlen_attention(*got, info_for(seqlens, context, backend, device), scale=0.3)
    (out.cpu().double() * w).sum().backward()
    want = [x.cpu().double().requires_grad_(True) for x in (q, k, v)]
    (reference_attention(*want, seqlens, context, scale=0.3) * w).sum().backward()
    for name, a, b in zip("qkv", got, want):
        assert a.grad.dtype == dtype and a.grad.shape == b.shape, name
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=tol, atol=tol * scale, msg=f"grad of {name}")


@pytest.mark.parametrize("backend, device, dtype, tol", PARAMS)
@pytest.mark.parametrize("seqlens, context, context_lens", PARTIAL)
def test_partial_context(backend, device, dtype, tol, seqlens, context, context_lens):
    """Forward (and backward where the backend has one here) when sequences continue only the first tokens of
    their context."""
    backward = not (backend == "flex" and device == "cpu")
    backend_or_skip(backend, device, dtype, backward=backward)
    t, h, hkv, d = sum(seqlens), 4, 2, 16
    q, k, v = make_qkv(t, h, hkv, d, seed=t, dtype=dtype, device=device)
    w = torch.randn(t, h, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = [x.clone().requires_grad_(backward) for x in (q, k, v)]
    with torch.set_grad_enabled(backward):
        out = varlen_attention(*got, info_for(seqlens, context, backend, device, context_lens), scale=0.3)
    want = [x.cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = reference_attention(*want, seqlens, context, scale=0.3, context_lens=context_lens)
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=tol, atol=tol)
    if backward:
        (out.cpu().double() * w).sum().backward()
        (ref * w).sum().backward()
        for name, a, b in zip("qkv", got, want):
            scale = b.grad.abs().max().item()
            torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("scale", [0.1, 0.7])
def test_explicit_scale(backend, scale):
    seqlens, context = (3, 0, 5, 4), (-1, 0, 0, -1)
    q, k, v = make_qkv(12, 4, 2, 16, seed=2)
    with torch.no_grad():
        out = varlen_attention(q, k, v, info_for(seqlens, context, backend), scale=scale)
        default = varlen_attention(q, k, v, info_for(seqlens, context, backend))
    want = reference_attention(q, k, v, seqlens, context, scale)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, default, atol=1e-3)  # the default scale (1/sqrt(16)) is a different function


def test_info_from_seqlens():
    info = info_for((3, 0, 5))
    assert info.cu_seqlens_q.tolist() == [0, 3, 3, 8] and info.cu_seqlens_q.dtype == torch.int32
    assert info.cu_seqlens_k is info.cu_seqlens_q and info.key_index is None
    assert info.seqlens_q == info.seqlens_k == (3, 0, 5)
    assert info.max_seqlen_q == info.max_seqlen_k == 5
    assert info_for(()).max_seqlen_q == 0


def test_info_with_context():
    info = info_for((2, 3, 0, 1), (-1, 0, 0, 0))
    assert info.seqlens_k == (2, 5, 0, 3)
    assert info.cu_seqlens_k.tolist() == [0, 2, 7, 7, 10] and info.cu_seqlens_k.dtype == torch.int32
    assert info.key_index.tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 1, 5]
    assert (info.max_seqlen_q, info.max_seqlen_k) == (3, 5)
    assert isinstance(info.max_seqlen_k, int)  # host values: no synchronisation in the layers


def test_flex_block_mask_built_once_per_info():
    info = info_for((3, 4, 5), (-1, 0, 0), "flex")
    mask = info.prepared.get(None)
    assert mask.shape[-2:] == (12, 12)
    q, k, v = make_qkv(12, 2, 2, 8, seed=4)
    with torch.no_grad():
        varlen_attention(q, k, v, info)
        varlen_attention(q, k, v, info, sliding_window=3)
        windowed = info.prepared.get(3)
        varlen_attention(q, k, v, info, sliding_window=3)
    assert info.prepared.get(None) is mask and info.prepared.get(3) is windowed


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_causal_first_token_sees_only_itself(backend):
    # the first token of every sequence without a context attends only to itself: its output is its value row
    q, k, v = make_qkv(9, 2, 2, 4, seed=3)
    with torch.no_grad():
        out = varlen_attention(q, k, v, info_for((3, 4, 2), backend=backend))
    for start in (0, 3, 7):
        torch.testing.assert_close(out[start], v[start])


def _run(q, k, v, seqlens, context, w):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = varlen_attention(*leaves, info_for(seqlens, context))
    (out * w).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("seqlens, context", [((4, 5, 3), None), ((4, 0, 5, 3), None), ((3, 4, 2, 5), (-1, 0, 0, -1))])
def test_no_leakage_between_sequences(h, hkv, seqlens, context):
    """Perturbing one sequence's q/k/v leaves the outputs and input gradients of every sequence that does
    not read it unchanged (a context is read by its continuations, and receives their gradients)."""
    context = context or [-1] * len(seqlens)
    t, d = sum(seqlens), 8
    q, k, v = make_qkv(t, h, hkv, d, seed=11)
    w = torch.randn(t, h, d, generator=torch.Generator().manual_seed(4))
    base_out, base_grads = _run(q, k, v, seqlens, context, w)
    bounds = torch.tensor((0, *seqlens)).cumsum(0).tolist()
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        span = slice(bounds[i], bounds[i + 1])
        g = torch.Generator().manual_seed(100 + i)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[span] += 5 * torch.randn(x[span].shape, generator=g)
        out, grads = _run(q2, k2, v2, seqlens, context, w)
        assert not torch.allclose(out[span], base_out[span], atol=1e-3)
        for j, m in enumerate(seqlens):
            if j == i or m == 0:
                continue
            other = slice(bounds[j], bounds[j + 1])
            if context[j] == i:  # j continues i: its outputs change
                assert not torch.allclose(out[other], base_out[other], atol=1e-4)
                continue
            torch.testing.assert_close(out[other], base_out[other], rtol=1e-6, atol=1e-6)
            for name, a, b in zip("qkv", grads, base_grads):
                if context[i] == j and name != "q":  # i reads j's keys and values: their gradients change
                    assert not torch.allclose(a[other], b[other], atol=1e-4), name
                else:
                    torch.testing.assert_close(a[other], b[other], rtol=1e-6, atol=1e-6, msg=name)


def test_empty_sequence_in_middle_matches_no_empty():
    q, k, v = make_qkv(9, 4, 2, 8, seed=5)
    a = varlen_attention(q, k, v, info_for((4, 0, 5)))
    b = varlen_attention(q, k, v, info_for((4, 5)))
    torch.testing.assert_close(a, b)


# --- choosing a backend ---------------------------------------------------------------------------------------


def test_auto_on_cpu_is_native_for_float32_else_sdpa_and_never_flex(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both are the intended CPU choices: no warning
        native = "native" if dispatch.native_available() else "sdpa"
        assert resolve_backend("attention", "cpu", "auto", dtype=torch.float32) == native
        for dtype in (torch.bfloat16, torch.float64):
            assert resolve_backend("attention", "cpu", "auto", dtype=dtype) == "sdpa"
        assert resolve_backend("attention", "cpu", "sdpa", dtype=torch.float32) == "sdpa"
        assert resolve_backend("attention", "cpu", "flex", dtype=torch.float32, backward=False) == "flex"
    monkeypatch.setattr(dispatch, "native_available", lambda: False)  # a checkout without fastnest._C built
    assert resolve_backend("attention", "cpu", "auto", dtype=torch.float32) == "sdpa"


@pytest.mark.skipif(not dispatch.native_available(), reason="fastnest._C is not built")
def test_native_attention_refuses_what_its_kernel_lacks():
    with pytest.raises(
        ValueError,
        match=r"attention 'native' cannot run here: fastnest._C's attention takes "
        r"float32 CPU tensors, got torch.bfloat16 on cpu; use attention='sdpa' or 'auto'",
    ):
        resolve_backend("attention", "cpu", "native", dtype=torch.bfloat16)
    info = info_for((3, 4), backend="native")
    q, k, v = make_qkv(7, 2, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"attention 'native' has no dropout, got dropout=0.1; use attention='sdpa'"):
        varlen_attention(q, k, v, info, dropout=0.1)
    q, k, v = make_qkv(7, 2, 2, 12, seed=0)
    with pytest.raises(ValueError, match=r"head dim that is a multiple of 8, got 12; use attention='sdpa'"):
        varlen_attention(q, k, v, info)
    # the op itself (torch.ops.fastnest.attention_forward) checks what its kernel trusts
    q, k, v = make_qkv(7, 2, 2, 16, seed=0)
    cu = torch.tensor([0, 3, 7])
    op = torch.ops.fastnest.attention_forward
    with pytest.raises(ValueError, match=r"key rows must lie in \[0, 7\), got \[0, 9\]"):
        op(q, k, v, torch.tensor([0, 1, 2, 3, 4, 5, 9]), cu, cu, 0.25, 0)
    with pytest.raises(ValueError, match=r"the offsets end at 7 queries and 7 keys; q has 7 and rows 6"):
        op(q, k, v, torch.arange(6), cu, cu, 0.25, 0)
    with pytest.raises(ValueError, match=r"more queries than keys"):
        op(q, k, v, torch.arange(7), cu, torch.tensor([0, 2, 7]), 0.25, 0)
    out, lse = op(q, k, v, torch.arange(7), cu, cu, 0.25, 0)
    strided = torch.randn(7, 2, 32)[..., ::2]
    with pytest.raises(ValueError, match=r"dout, out and lse must be contiguous float32"):
        torch.ops.fastnest.attention_backward(strided, q, k, v, out, lse, torch.arange(7), cu, cu, 0.25, 0)


def fake_gpu(monkeypatch, capability, installed):
    """A CUDA device of ``capability`` with the attention packages in ``installed`` (find_spec answers for them
    only; everything else is looked up for real)."""
    real = importlib.util.find_spec
    packages = {"flash_attn", "xformers"}

    def find_spec(name, *args, **kwargs):
        if name in packages:
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(dispatch.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_auto_picks_flash_from_ampere(monkeypatch, capability):
    fake_gpu(monkeypatch, capability, {"flash_attn", "xformers"})
    assert resolve_backend("attention", "cuda", "auto", dtype=torch.bfloat16) == "flash"
    assert resolve_backend("attention", "cuda", "flash", dtype=torch.float16) == "flash"
    assert resolve_backend("attention", "cuda", "auto", dtype=torch.float32) == "xformers"  # flash: half only


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_flash_refused_before_ampere(monkeypatch, capability):
    fake_gpu(monkeypatch, capability, {"flash_attn", "xformers"})
    assert resolve_backend("attention", "cuda", "auto", dtype=torch.bfloat16) == "xformers"
    want = r"FlashAttention 2 needs compute capability >= 8\.0 \(Ampere\), this GPU has {}\.{}".format(*capability)
    with pytest.raises(ValueError, match=r"attention 'flash' is unavailable: " + want):
        check_backend("attention", "flash")
    with pytest.raises(ValueError, match=want):
        resolve_backend("attention", "cuda", "flash", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "capability, installed, why",
    [
        ((9, 0), set(), r"flash: the flash_attn package is not installed .*; xformers: the xformers package is not"),
        ((7, 5), {"flash_attn"}, r"flash: FlashAttention 2 needs compute capability >= 8\.0 .* 7\.5; xformers: the"),
    ],
)
def test_auto_warns_when_it_falls_back_to_sdpa_on_cuda(monkeypatch, capability, installed, why):
    fake_gpu(monkeypatch, capability, installed)
    with pytest.warns(UserWarning, match=r"attention 'auto' on CUDA falls back to 'sdpa' .*" + why):
        assert resolve_backend("attention", "cuda", "auto", dtype=torch.bfloat16) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named explicitly: no warning
        assert resolve_backend("attention", "cuda", "sdpa", dtype=torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("name", ["flash2", "eager", "SDPA", ""])
def test_error_unknown_backend(name):
    with pytest.raises(ValueError, match=r"is not one of \('auto', 'flash', 'xformers', 'flex', 'native', 'sdpa'\)"):
        check_backend("attention", name)
    with pytest.raises(ValueError, match="is not one of"):
        info_for((2, 3), backend=name)


@pytest.mark.parametrize("backend, package", [("flash", "flash_attn"), ("xformers", "xformers")])
def test_error_cuda_backend_on_cpu(backend, package):
    with pytest.raises(ValueError, match=rf"attention '{backend}' .*({package}|CUDA)"):
        resolve_backend("attention", "cpu", backend, dtype=torch.bfloat16)
    if not CUDA:  # unavailable in this process: already at the check done when patching
        with pytest.raises(ValueError, match=rf"attention '{backend}' is unavailable: .*{package}"):
            check_backend("attention", backend)


def test_error_flash_in_float32():
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("attention", "cuda", "flash", dtype=torch.float32)


def test_error_flex_backward_on_cpu():
    with pytest.raises(ValueError, match="FlexAttention's backward needs CUDA"):
        resolve_backend("attention", "cpu", "flex", dtype=torch.float32, backward=True)


def test_error_flex_dropout():
    q, k, v = make_qkv(5, 2, 2, 8, seed=1)
    with pytest.raises(ValueError, match="dropout"):
        varlen_attention(q, k, v, info_for((5,), backend="flex"), dropout=0.1)


def test_error_shapes():
    q, k, v = make_qkv(6, 4, 2, 8, seed=1)
    with pytest.raises(ValueError, match="sum to 5 but query/key/value hold 6/6/6"):
        varlen_attention(q, k, v, info_for((2, 3)))
    with pytest.raises(ValueError, match="3 key/value heads"):
        varlen_attention(q, k[:, :1].expand(6, 3, 8), v[:, :1].expand(6, 3, 8), info_for((6,)))
    with pytest.raises(ValueError, match=r"\[tokens, heads, dim\]"):
        varlen_attention(q[None], k, v, info_for((6,)))
