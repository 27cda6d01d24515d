"""Hugging Face's attention kwargs on varlen_attention: ``sliding_window``, ``softcap`` and ``s_aux`` (sinks)
against the float64 reference with the same options, on every backend that takes them (CUDA ones skipped
without CUDA); a backend without one is a ValueError naming those with it."""

from dataclasses import replace

import pytest
import torch

from fastnest.attention import BACKENDS, VarlenInfo, varlen_attention
from fastnest.attention.naive import reference_attention
from tests.test_attention import CASES, SETUPS, backend_or_skip, info_for, make_qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


OPTION_SETS = [
    {"sliding_window": 1},
    {"sliding_window": 3},
    {"sliding_window": 6},
    {"softcap": 0.5},
    {"s_aux": "sinks"},
    {"sliding_window": 2, "softcap": 1.5, "s_aux": "sinks"},
]
SUPPORTED = {"sdpa": {"sliding_window"}, "native": {"sliding_window"}, "flex": {"sliding_window", "softcap", "s_aux"}}
SUPPORTED |= {"flash": {"sliding_window", "softcap"}, "xformers": set()}


def with_sinks(options, heads):
    sinks = torch.linspace(-1.0, 2.0, heads)
    return {k: sinks if v == "sinks" else v for k, v in options.items()}


def option_params(backward):
    return [
        pytest.param(b, dev, dt, tol, opts, id=f"{b}-{dev}-{str(dt)[6:]}-{'-'.join(opts)}")
        for b in BACKENDS
        for dev, dt, tol in SETUPS[b]
        for opts in OPTION_SETS
        if set(opts) <= SUPPORTED[b] and not (backward and b == "flex" and dev == "cpu")
    ]


@pytest.mark.parametrize("backend, device, dtype, tol, options", option_params(backward=False))
@pytest.mark.parametrize("seqlens, context", CASES[1:3] + CASES[6:])
def test_forward_with_options(backend, device, dtype, tol, options, seqlens, context):
    backend_or_skip(backend, device, dtype, backward=False)
    h, hkv, d = 4, 2, 16
    options = with_sinks(options, h)
    q, k, v = make_qkv(sum(seqlens), h, hkv, d, seed=3 * sum(seqlens), dtype=dtype, device=device)
    q = 3 * q  # larger scores: the softcap bends them
    on_device = {k_: x.to(device) if isinstance(x, torch.Tensor) else x for k_, x in options.items()}
    info = info_for(seqlens, context, backend, device)
    with torch.no_grad():
        out = varlen_attention(q, k, v, info, **on_device)
    want = reference_attention(q.cpu(), k.cpu(), v.cpu(), seqlens, context, **options)
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)
    plain = reference_attention(q.cpu(), k.cpu(), v.cpu(), seqlens, context)
    if set(options) != {"sliding_window"} or options["sliding_window"] < info.max_seqlen_k:
        assert not torch.allclose(want, plain, atol=1e-3)  # the options change the function


@pytest.mark.parametrize("backend, device, dtype, tol, options", option_params(backward=True))
def test_backward_with_options(backend, device, dtype, tol, options):
    backend_or_skip(backend, device, dtype, backward=True)
    seqlens, context = (6, 1, 9, 2, 2, 3), (-1, 0, 0, -1, -1, 4)
    h, hkv, d, t = 4, 2, 16, sum(seqlens)
    options = with_sinks(options, h)
    q, k, v = make_qkv(t, h, hkv, d, seed=5, dtype=dtype, device=device)
    w = torch.randn(t, h, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = [x.clone().requires_grad_(True) for x in (q, k, v)]
    on_device = {k_: x.to(device) if isinstance(x, torch.Tensor) else x for k_, x in options.items()}
    (
        varlen_attention(*got, info_for(seqlens, context, backend, device), **on_device).cpu().double() * w
    ).sum().backward()
    want = [x.cpu().double().requires_grad_(True) for x in (q, k, v)]
    (reference_attention(*want, seqlens, context, **options) * w).sum().backward()
    for name, a, b in zip("qkv", got, want):
        scale = max(b.grad.abs().max().item(), 1.0)  # a window of 1: q and k get no gradient
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=tol, atol=tol * scale, msg=f"grad of {name}")


@pytest.mark.parametrize(
    "backend, option, value, supported",
    [
        ("sdpa", "softcap", 30.0, r"\('flash', 'flex'\)"),
        ("sdpa", "s_aux", "sinks", r"\('flex',\)"),
        ("xformers", "sliding_window", 3, r"\('flash', 'flex', 'native', 'sdpa'\)"),
    ],
)
def test_error_option_not_supported_names_the_backends_that_are(backend, option, value, supported):
    q, k, v = make_qkv(5, 4, 2, 8, seed=1)
    info = VarlenInfo(backend, (5,), (5,), (-1,), (0,), torch.tensor([0, 5]), torch.tensor([0, 5]), None, 5, 5)
    options = with_sinks({option: value}, 4)
    with pytest.raises(
        ValueError, match=rf"attention backend '{backend}' does not support {option}=.*; backends that do: {supported}"
    ):
        varlen_attention(q, k, v, info, **options)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sliding_window": 0}, "sliding_window must be a positive int"),
        ({"sliding_window": 2.5}, "sliding_window must be a positive int"),
        ({"softcap": -1.0}, "softcap must be > 0"),
        ({"s_aux": torch.zeros(3)}, r"s_aux must hold one logit per query head \(4,\), got shape \(3,\)"),
    ],
)
def test_error_bad_option_values(options, match):
    q, k, v = make_qkv(5, 4, 2, 8, seed=1)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, info_for((5,), backend="flex"), **options)


def test_window_covering_every_sequence_is_no_window(monkeypatch):
    """A window of at least the longest key count changes nothing, so a backend without windows runs it."""
    from fastnest.attention import xformers

    seqlens, context = (3, 4, 5), (-1, 0, 0)  # at most 3 + 5 = 8 keys
    q, k, v = make_qkv(12, 4, 2, 8, seed=1)
    seen = []

    def attend(q, k, v, info, scale, dropout, **options):
        seen.append(options)
        return reference_attention(q, k, v, info.seqlens_q, info.context).to(q.dtype)

    monkeypatch.setattr(xformers, "attend", attend)
    info = replace(info_for(seqlens, context), backend="xformers")
    varlen_attention(q, k, v, info, sliding_window=8)
    assert seen == [{}]
    with pytest.raises(ValueError, match="'xformers' does not support sliding_window=7"):
        varlen_attention(q, k, v, info, sliding_window=7)
    with torch.no_grad():
        torch.testing.assert_close(
            varlen_attention(q, k, v, info_for(seqlens, context), sliding_window=8),
            varlen_attention(q, k, v, info_for(seqlens, context)),
        )
