"""One half dtype for q, k and v (issue 18, item 1): under bf16 autocast with fp32 weights, HF's Llama hands the
attention fp32 q/k (RoPE's fp32 cos/sin) and a bf16 v. A patched tiny LLaVA training step under CPU autocast
runs through each fast backend's entry point with a spy in place of its kernel call: the spy asserts what
fastnest hands over (dtypes, tokens-major layout) and computes the result with the float64 reference; the
GPU test at the end runs the real kernels under CUDA autocast."""

from __future__ import annotations

import copy

import pytest
import torch

import fastnest
from fastnest import dispatch
from fastnest.attention import VarlenInfo, flash, flex, varlen_attention, xformers
from fastnest.attention.naive import reference_attention
from fastnest.attention.varlen import compute_dtype
from fastnest.hf.tiny import tiny_llava
from tools.batches import IMG, make_batch

CUDA = torch.cuda.is_available()
SCALES = (1, 4, 16)
ROWS = [[6, IMG, 9], [3, IMG, 5, IMG, 4], [7]]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def tiny(seed: int = 0, hidden: int = HEADS * HEAD_DIM):
    torch.manual_seed(seed)
    return tiny_llava(grid=4, patch_size=2, vision_hidden=16, vision_layers=1, hidden=hidden, layers=2, vocab=96)


def test_compute_dtype():
    f32, f64, bf16, f16 = (
        torch.empty(2, 1, 1, dtype=d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )
    assert compute_dtype(f32, f32, f32) == torch.float32
    assert compute_dtype(f32, f32, bf16) == torch.bfloat16  # the one half dtype among them
    assert compute_dtype(f16, f32, f16) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(f32, f32, f32) == torch.bfloat16  # the autocast dtype
        assert compute_dtype(f32, f32, bf16) == torch.bfloat16
    for bad in ((f32, f64, f32), (f32, bf16, f16)):
        with pytest.raises(ValueError, match="dtypes .* differ outside autocast"):
            compute_dtype(*bad)


def test_mixed_dtypes_under_autocast_reach_sdpa_as_one_and_return_it():
    seqlens, context = (3, 4, 5), (-1, 0, 0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, h, 8, generator=g) for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v.bfloat16(), VarlenInfo.from_seqlens(seqlens, context))
    assert out.dtype == torch.bfloat16  # what HF's sdpa and eager return under autocast
    want = reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), seqlens, context)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def allow_every_backend_on_cpu(monkeypatch):
    """Let the dispatch resolve flash/xformers/flex (with a backward) for CPU tensors: the spies stand in for
    their kernels, so only what fastnest hands them is under test."""
    real = dispatch._process_error
    monkeypatch.setattr(dispatch, "_process_error", lambda op, b: None if op == "attention" else real(op, b))
    monkeypatch.setattr(dispatch, "_attention_error", lambda *args: None)
    monkeypatch.setattr(xformers, "prepare", lambda info, device: "xformers bias")  # its bias needs the package


def tail_reference(q, k, v, info, scale):
    """Tail queries (``VarlenInfo.tail_queries``) by the reference: each sequence's n queries as the last n rows
    of a square over its m keys."""
    keys, values, out = k[info.key_index], v[info.key_index], []
    for q_, k_, v_ in zip(q.split(info.seqlens_q), keys.split(info.seqlens_k), values.split(info.seqlens_k)):
        n, m = len(q_), len(k_)
        square = torch.cat([q_.new_zeros(m - n, *q_.shape[1:]), q_])
        out.append(reference_attention(square, k_, v_, (m,), scale=scale)[m - n :])
    return torch.cat(out)


def spy(backend: str, calls: list):
    def attend(q, k, v, info, scale, dropout, **options):
        assert info.backend == backend and not options
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16, (q.dtype, k.dtype, v.dtype)
        keys = info.total if info.key_rows is None else info.key_rows
        assert q.shape == (info.total, HEADS, HEAD_DIM) and k.shape == v.shape == (keys, KV_HEADS, HEAD_DIM)
        assert q.is_contiguous() or q.stride(-1) == 1
        calls.append(info.total)
        if info.query_index is not None:
            return tail_reference(q, k, v, info, scale).to(q.dtype)
        out = reference_attention(q, k, v, info.seqlens_q, info.context, scale=scale)
        return out.to(q.dtype)

    return attend


def autocast_step(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch.inputs())
    out.loss.backward()
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend, module", [("flash", flash), ("xformers", xformers), ("flex", flex)])
def test_autocast_training_step_hands_each_backend_one_half_dtype(monkeypatch, backend, module):
    model = tiny()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = make_batch(model, ROWS)
    plain = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES, attention="sdpa").train()
    want = autocast_step(plain, batch)

    allow_every_backend_on_cpu(monkeypatch)
    calls: list = []
    monkeypatch.setattr(module, "attend", spy(backend, calls))
    fast = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES, attention=backend).train()
    got = autocast_step(fast, batch)
    # every layer; the first over the whole packed stream, the last (but on flex) at the read rows' tails
    assert len(calls) == 2 and calls[0] == got.lm_tokens and (calls[1] < calls[0]) == (backend != "flex")
    torch.testing.assert_close(got.scale_losses, want.scale_losses, rtol=2e-2, atol=0)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        if b.grad is not None:
            assert a.grad is not None and a.grad.dtype == torch.float32, name
            torch.testing.assert_close(a.grad, b.grad, rtol=0.1, atol=2e-2 * b.grad.abs().max().item(), msg=name)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "xformers", "flex", "sdpa"])
def test_cuda_autocast_training_step_runs_every_backend(backend):
    """The real kernels under bf16 autocast over fp32 weights (``fastnest train --bf16`` on one GPU)."""
    try:
        dispatch.check_backend("attention", backend)
    except ValueError as e:
        pytest.skip(str(e))
    model = tiny(hidden=64).cuda()  # head dim 16: the kernels' smallest tile
    batch = make_batch(model, ROWS)
    inputs = {k: v.cuda() for k, v in batch.inputs().items()}
    ref = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES, attention="sdpa").train()
    fast = fastnest.patch_llava(copy.deepcopy(model), scales=SCALES, attention=backend).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = ref(**inputs), fast(**inputs)
    got.loss.backward()
    torch.testing.assert_close(got.scale_losses, want.scale_losses, rtol=3e-2, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
