"""The native cross-entropy chunk kernel (fastnest/ops/cross_entropy/native.py, kernels/cpu/cross_entropy.cpp)
against the PyTorch chunk kernel and float64 F.cross_entropy.

Skipped only when the extension is not built (the skip reason says why); CI builds it, so these run there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastnest.constants import IGNORE_INDEX
from fastnest.dispatch import native_available, native_error
from fastnest.ops.cross_entropy import torch_chunk

pytestmark = pytest.mark.skipif(not native_available(), reason=str(native_error()))

if native_available():
    from fastnest.ops.cross_entropy import native

# gradients relative to their largest entry, losses relative; bf16/fp16 round the stored gradient once
TOL = {torch.float64: 1e-6, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
DTYPES = list(TOL)


def inputs(rows, vocab, dtype, *, scale=3.0, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[list(ignore)] = IGNORE_INDEX
    coef = torch.rand(rows, generator=g) + 0.5
    return logits, targets, coef


def run(kernel, logits, targets, coef):
    z, loss = logits.clone(), torch.full((logits.shape[0],), float("nan"))
    kernel(z, targets, coef, loss)
    return z, loss


def reference(logits, targets, coef):
    """float64: per-row F.cross_entropy and coef * its gradient (0 and 0 for an ignored row)."""
    z = logits.double().requires_grad_()
    ce = F.cross_entropy(z, targets, reduction="none", ignore_index=IGNORE_INDEX)
    (ce * coef.double()).sum().backward()
    return z.grad, ce.detach()


def check(logits, targets, coef, dtype):
    z, loss = run(native.ce_grad_, logits, targets, coef)
    grad_ref, loss_ref = reference(logits, targets, coef)
    assert z.dtype == dtype and loss.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), loss_ref, rtol=max(tol, 2e-6), atol=max(tol, 2e-6))
    scale = grad_ref.abs().max().item() or 1.0
    torch.testing.assert_close(z.double(), grad_ref, rtol=tol, atol=tol * scale)
    return z, loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 17, 1000, 4099])  # not multiples of 8/16 (AVX2/AVX-512 widths), and 1
def test_matches_reference(dtype, vocab):
    logits, targets, coef = inputs(9, vocab, dtype, seed=vocab)
    check(logits, targets, coef, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_the_torch_chunk_kernel(dtype):
    logits, targets, coef = inputs(33, 515, dtype, ignore=(0, 5), seed=3)
    z, loss = run(native.ce_grad_, logits, targets, coef)
    z_torch, loss_torch = run(torch_chunk.ce_grad_, logits, targets, coef)
    torch.testing.assert_close(loss, loss_torch, rtol=2e-6, atol=2e-6)
    tol = TOL[dtype]
    torch.testing.assert_close(z.float(), z_torch.float(), rtol=tol, atol=tol * z_torch.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignored_rows_get_zero_loss_and_zero_gradient(dtype):
    logits, targets, coef = inputs(6, 23, dtype, ignore=(0, 2, 5), seed=1)
    z, loss = check(logits, targets, coef, dtype)
    assert torch.equal(loss[[0, 2, 5]], torch.zeros(3))
    assert torch.equal(z[[0, 2, 5]].float(), torch.zeros(3, 23))
    assert (z[[1, 3, 4]] != 0).any(dim=1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_do_not_overflow(dtype):
    logits, targets, coef = inputs(5, 130, dtype, scale=300.0, seed=2)
    logits = (logits.double() + 1000).to(dtype)  # exp overflows fp32 and fp64 from 89 and 710; the softmax is fine
    z, loss = run(native.ce_grad_, logits, targets, coef)
    assert torch.isfinite(z).all() and torch.isfinite(loss).all()
    grad_ref, loss_ref = reference(logits, targets, coef)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-3, atol=1e-3)
    tol = max(TOL[dtype], 2e-4)  # logits near 2000: fp32 holds lse to ~1e-4, so softmax = exp(z - lse) to ~1e-4
    torch.testing.assert_close(z.double(), grad_ref, rtol=tol, atol=tol * grad_ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates(dtype):
    logits, targets, coef = inputs(4, 40, dtype, seed=4)
    logits[1, 7] = float("nan")
    z, loss = run(native.ce_grad_, logits, targets, coef)
    assert torch.isnan(loss[1]) and torch.isnan(z[1]).all()
    rest = [0, 2, 3]
    assert torch.isfinite(loss[rest]).all() and torch.isfinite(z[rest]).all()


def test_many_rows_run_on_every_thread_count():
    logits, targets, coef = inputs(300, 1031, torch.float32, ignore=(7, 150), seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(native.ce_grad_, logits, targets, coef))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    check(logits, targets, coef, torch.float32)


def test_strided_rows():
    buffer = torch.randn(6, 50)
    logits = buffer[:, :37]  # rows contiguous, row stride 50
    targets, coef = torch.tensor([0, 36, IGNORE_INDEX, 5, 9, 1]), torch.ones(6)
    z, loss = logits.clone(), torch.empty(6)
    native.ce_grad_(logits, targets, coef, loss)
    want_z, want_loss = run(native.ce_grad_, z.contiguous(), targets, coef)
    torch.testing.assert_close(logits, want_z, rtol=0, atol=0)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)


def test_empty_chunk_is_a_no_op():
    native.ce_grad_(torch.empty(0, 5), torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0))


def _bad_calls():
    z, t, c, loss = torch.randn(3, 5), torch.tensor([0, 4, IGNORE_INDEX]), torch.ones(3), torch.empty(3)
    return [
        (r"target 5 is outside \[0, 5\)", lambda: native.ce_grad_(z, torch.tensor([0, 5, 1]), c, loss)),
        (r"target -1 is outside \[0, 5\)", lambda: native.ce_grad_(z, torch.tensor([0, -1, 1]), c, loss)),
        ("logits has dtype torch.int64", lambda: native.ce_grad_(z.long(), t, c, loss)),
        (r"logits must be \[rows, vocab >= 1\]", lambda: native.ce_grad_(z[0], t, c, loss)),
        (r"logits must be \[rows, vocab >= 1\]", lambda: native.ce_grad_(z[:, :0], t, c, loss)),
        ("logits rows must be contiguous", lambda: native.ce_grad_(z.t(), t, c, loss)),
        ("logits must be a CPU tensor", lambda: native.ce_grad_(z.to("meta"), t, c, loss)),
        ("logits must be a torch.Tensor", lambda: native.ce_grad_(z.numpy(), t, c, loss)),
        ("targets has dtype torch.int32", lambda: native.ce_grad_(z, t.int(), c, loss)),
        (r"targets must be a contiguous \[3\] tensor", lambda: native.ce_grad_(z, t[:2], c, loss)),
        ("coef has dtype torch.float64", lambda: native.ce_grad_(z, t, c.double(), loss)),
        (r"loss must be a contiguous \[3\] tensor", lambda: native.ce_grad_(z, t, c, torch.empty(6)[::2])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises(case):
    match, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_extension_rejects_bad_arguments():
    """The raw module's own checks (a wrong call must not reach the kernel)."""
    from fastnest import _C

    z, t, c, loss = torch.randn(3, 5), torch.tensor([0, 9, 1]), torch.ones(3), torch.empty(3)
    args = (z.data_ptr(), 5, t.data_ptr(), c.data_ptr(), loss.data_ptr(), 3, 5)
    with pytest.raises(ValueError, match="target 9 of row 1 is outside"):
        _C.ce_grad(*args, 0, 1)
    with pytest.raises(ValueError, match="dtype code 7"):
        _C.ce_grad(*args, 7, 1)
    with pytest.raises(ValueError, match="row_stride 4 is smaller than vocab 5"):
        _C.ce_grad(z.data_ptr(), 4, t.data_ptr(), c.data_ptr(), loss.data_ptr(), 3, 5, 0, 1)
    with pytest.raises(ValueError, match="non-null"):
        _C.ce_grad(0, 5, t.data_ptr(), c.data_ptr(), loss.data_ptr(), 3, 5, 0, 1)
