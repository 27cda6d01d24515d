"""fused_linear_cross_entropy against plain float64 logits + F.cross_entropy, group by group, forward and backward.

Every backend runs: chunked PyTorch, the Triton kernel (in Triton's interpreter on CPU, so shapes stay small) and
the native kernel (fastnest._C; skipped where it is not built).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastnest import dispatch
from fastnest.ops.cross_entropy.function import MIN_CHUNK_ROWS, chunk_rows, fused_linear_cross_entropy
from fastnest.ops.cross_entropy.naive import grouped_cross_entropy

NATIVE = pytest.mark.skipif(not dispatch.native_available(), reason=str(dispatch.native_error()))
BACKENDS = ["torch", "triton", pytest.param("native", marks=NATIVE)]
IGNORE = -100


def reference(hidden, weight, bias, targets, groups, num_groups, num_items=None):
    """float64: full logits, then group g = sum of F.cross_entropy over its own and group -1 non-ignored targets,
    divided by their count (or num_items); loss = mean over groups."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    per_group = []
    for g in range(num_groups):
        members = [i for i in range(len(targets)) if int(groups[i]) in (g, -1) and int(targets[i]) != IGNORE]
        total = F.cross_entropy(logits[members], targets[members], reduction="sum")
        denom = len(members) if num_items is None else float(num_items)
        per_group.append(total / denom)
    per_group = torch.stack(per_group)
    return per_group.mean(), per_group


def make(tokens, hidden_size, vocab, groups, *, dtype=torch.float32, bias=False, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[list(ignore)] = IGNORE
    assert len(groups) == tokens
    return hidden, weight, b, targets, torch.tensor(groups, dtype=torch.long)


def leaves_float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


# rtol on losses; gradients are compared relative to their largest entry (atol = rtol * max |ref grad|)
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
FP32 = TOL[torch.float32]


def assert_close(got, ref, rtol):
    if got is None or ref is None:
        assert got is None and ref is None
        return
    scale = max(ref.abs().max().item(), 1e-12) if ref.numel() else 1.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * scale)


CASES = [
    # tokens, groups, ignored positions, chunk_size
    (10, [0, 0, 1, 1, 1, 2, 2, -1, 0, 1], (), 3),  # chunk does not divide T
    (8, [-1, 0, 1, -1, 1, 1, 0, -1], (1, 4), None),  # shared targets count towards both groups; two ignored
    (7, [2, 1, 0, 2, 1, 0, -1], (6,), 1),  # one row per chunk, the shared target ignored
    (5, [0, 0, 0, 0, 0], (), 8),  # chunk larger than T
    (1, [0], (), None),  # T = 1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, groups, ignore, chunk", CASES)
def test_matches_float64_reference(backend, dtype, tokens, groups, ignore, chunk):
    num_groups = max(groups) + 1
    hidden, weight, bias, targets, tg = make(tokens, 16, 37, groups, dtype=dtype, bias=True, seed=tokens, ignore=ignore)
    loss, per_group = fused_linear_cross_entropy(
        hidden, weight, targets, tg, num_groups, bias=bias, chunk_size=chunk, backend=backend
    )
    assert loss.dtype == per_group.dtype == torch.float32 and per_group.shape == (num_groups,)
    loss.backward()
    ref = leaves_float64(hidden, weight, bias)
    ref_loss, ref_per_group = reference(*ref, targets, tg, num_groups)
    ref_loss.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(per_group.double(), ref_per_group.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    for got, want, leaf in zip(grads(hidden, weight, bias), grads(*ref), (hidden, weight, bias)):
        assert got.dtype == dtype and got.shape == leaf.shape
        assert_close(got, want, tol)
    for i in ignore:
        assert not hidden.grad[i].any()  # an ignored target contributes nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", ["per_group", "both", "loss"])
def test_gradient_through_per_group(backend, use):
    """per_group's gradient weights each group differently: backward recomputes with per-token weights."""
    groups = [0, 1, 1, -1, 2, 0, 2, 2, -1, 1, 0]
    hidden, weight, bias, targets, tg = make(len(groups), 8, 29, groups, bias=True, seed=4, ignore=(5,))
    w = torch.tensor([0.5, -2.0, 3.0])

    def objective(loss, per_group):
        if use == "per_group":
            return (w.to(per_group.dtype) * per_group).sum()
        if use == "both":
            return 0.7 * loss + (w.to(per_group.dtype) * per_group).sum()
        return 0.7 * loss

    objective(
        *fused_linear_cross_entropy(hidden, weight, targets, tg, 3, bias=bias, chunk_size=4, backend=backend)
    ).backward()
    ref = leaves_float64(hidden, weight, bias)
    objective(*reference(*ref, targets, tg, 3)).backward()
    for got, want in zip(grads(hidden, weight, bias), grads(*ref)):
        assert_close(got, want, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [1, 7, 23.0, "tensor"])
def test_num_items_sets_every_denominator(backend, num_items):
    groups = [-1, 0, 1, 1, 0, -1, 1]
    n = torch.tensor(17) if num_items == "tensor" else num_items
    hidden, weight, _, targets, tg = make(len(groups), 8, 19, groups, seed=5, ignore=(2,))
    loss, per_group = fused_linear_cross_entropy(
        hidden, weight, targets, tg, 2, num_items=n, chunk_size=3, backend=backend
    )
    loss.backward()
    ref = leaves_float64(hidden, weight)
    ref_loss, ref_per_group = reference(*ref, None, targets, tg, 2, num_items=float(n))
    ref_loss.backward()
    torch.testing.assert_close(per_group.double(), ref_per_group.detach(), rtol=FP32, atol=1e-6)
    for got, want in zip(grads(hidden, weight), grads(*ref)):
        assert_close(got, want, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_with_every_target_ignored(backend):
    """Group 1's targets are all ignored: its loss is 0/0 = NaN (the mean of nothing, as grouped_cross_entropy
    and Hugging Face's loss); the other groups and every gradient they give are exact and finite."""
    groups = [0, 1, 0, 1, 2, 2, 0]
    hidden, weight, _, targets, tg = make(len(groups), 8, 23, groups, seed=6, ignore=(1, 3))
    loss, per_group = fused_linear_cross_entropy(hidden, weight, targets, tg, 3, chunk_size=2, backend=backend)
    assert torch.isnan(per_group[1]) and torch.isnan(loss)
    naive = grouped_cross_entropy(hidden.detach() @ weight.detach().t(), targets, tg, 3)[1]
    assert torch.isnan(naive[1])
    (per_group[0] + 2 * per_group[2]).backward()
    ref = leaves_float64(hidden, weight)
    _, ref_per_group = reference(*ref, None, targets, tg, 3)
    torch.testing.assert_close(per_group[[0, 2]].double(), ref_per_group[[0, 2]].detach(), rtol=FP32, atol=1e-6)
    (ref_per_group[0] + 2 * ref_per_group[2]).backward()
    for got, want in zip(grads(hidden, weight), grads(*ref)):
        assert torch.isfinite(got).all()
        assert_close(got, want, FP32)
    assert not hidden.grad[[1, 3]].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    hidden, weight, bias, targets, tg = make(0, 8, 11, [], bias=True)
    loss, per_group = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, bias=bias, backend=backend)
    assert torch.isnan(per_group).all()  # no target in any group: 0/0
    loss, per_group = fused_linear_cross_entropy(
        hidden, weight, targets, tg, 2, bias=bias, num_items=4, backend=backend
    )
    assert loss.item() == 0.0 and not per_group.any()
    loss.backward()
    assert hidden.grad.shape == (0, 8)
    assert not weight.grad.any() and not bias.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored_with_num_items(backend):
    hidden, weight, _, targets, tg = make(4, 8, 11, [0, 1, -1, 0], seed=7, ignore=(0, 1, 2, 3))
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, num_items=5, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [3, 1025, 5000])  # one partial block; just over the small block; 2 large blocks
def test_vocab_not_a_multiple_of_the_block(backend, vocab):
    groups = [0, -1, 1]
    hidden, weight, bias, targets, tg = make(3, 8, vocab, groups, bias=True, seed=vocab)
    targets[0] = vocab - 1  # the last column, inside the ragged block
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, bias=bias, backend=backend)
    loss.backward()
    ref = leaves_float64(hidden, weight, bias)
    ref_loss, _ = reference(*ref, targets, tg, 2)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=FP32, atol=1e-6)
    for got, want in zip(grads(hidden, weight, bias), grads(*ref)):
        assert_close(got, want, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradients_add_up(backend):
    """The output projection is the input embedding: its gradient is the sum of both uses."""
    vocab, hidden_size = 31, 8
    g = torch.Generator().manual_seed(8)
    embed = torch.randn(vocab, hidden_size, generator=g).requires_grad_()
    mix = torch.randn(hidden_size, hidden_size, generator=g) / 3
    ids = torch.randint(0, vocab, (9,), generator=g)
    targets, tg = ids.roll(-1), torch.tensor([0, 0, 1, 1, -1, 0, 1, 1, 0])

    loss, _ = fused_linear_cross_entropy(
        torch.tanh(embed[ids] @ mix), embed, targets, tg, 2, chunk_size=4, backend=backend
    )
    loss.backward()
    (ref_embed,) = leaves_float64(embed)
    ref_loss, _ = reference(torch.tanh(ref_embed[ids] @ mix.double()), ref_embed, None, targets, tg, 2)
    ref_loss.backward()
    assert_close(embed.grad, ref_embed.grad, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    groups = [0, 1, 1, 0, -1]
    hidden, weight, _, targets, tg = make(5, 8, 13, groups, seed=9)
    weight.requires_grad_(False)
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, chunk_size=2, backend=backend)
    loss.backward()
    assert weight.grad is None
    ref = leaves_float64(hidden, weight)
    reference(*ref, None, targets, tg, 2)[0].backward()
    assert_close(hidden.grad, ref[0].grad, FP32)
    with torch.no_grad():
        again, _ = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, backend=backend)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the loss computes as an autocast linear layer would: in bf16, gradients back in fp32."""
    groups = [0, 1, 1, 0, -1, 1]
    hidden, weight, bias, targets, tg = make(6, 16, 21, groups, bias=True, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, bias=bias, chunk_size=4)
    loss.backward()
    assert weight.grad.dtype == torch.float32
    bf16 = [t.detach().to(torch.bfloat16) for t in (hidden, weight, bias)]
    ref = leaves_float64(*bf16)
    ref_loss, _ = reference(*ref, targets, tg, 2)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    for got, want in zip(grads(hidden, weight, bias), grads(*ref)):
        assert_close(got, want, TOL[torch.bfloat16])


@NATIVE
def test_native_backend_runs_the_native_kernel(monkeypatch):
    """Where dispatch picks "native" (a CPU with fastnest._C built), the chunks run the native kernel."""
    from fastnest.ops.cross_entropy import native

    assert dispatch.resolve_backend("cross_entropy", "cpu") == "native"
    calls = []
    original = native.ce_grad_
    monkeypatch.setattr(native, "ce_grad_", lambda *a: calls.append(a[0].shape) or original(*a))
    hidden, weight, _, targets, tg = make(6, 8, 17, [0, 1, 0, 1, -1, 0], seed=11)
    got = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, chunk_size=4)[1]
    plain = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, chunk_size=4, backend="torch")[1]
    assert calls == [(4, 17), (2, 17)]
    torch.testing.assert_close(got, plain, rtol=FP32, atol=0)


# --- memory: no [T, V] tensor, ever ------------------------------------------------------------------------


class LargestOutputs(TorchDispatchMode):
    """Records the shape and byte size of every tensor any ATen op returns (what each op allocates for its
    result, or a view of it)."""

    def __init__(self):
        super().__init__()
        self.shapes, self.nbytes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.nbytes.append(t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_full_logits_ever_exist(backend):
    """T = 300 labelled tokens, V = 1000: every op's result in forward and backward stays within one logits chunk
    (MIN_CHUNK_ROWS rows) or the weight gradient [V, Hd]; a [T, V] tensor never appears."""
    tokens, hidden_size, vocab = 300, 4, 1000
    groups = [i % 3 - 1 for i in range(tokens)]
    hidden, weight, bias, targets, tg = make(tokens, hidden_size, vocab, groups, bias=True, seed=12)
    rows = chunk_rows(tokens, hidden_size, vocab)
    assert rows == MIN_CHUNK_ROWS < tokens
    with LargestOutputs() as spy:
        loss, per_group = fused_linear_cross_entropy(hidden, weight, targets, tg, 2, bias=bias, backend=backend)
        (loss + per_group.sum()).backward()  # the recomputing backward too
    # (Triton's interpreter copies the chunk's storage as bytes, within the same bound)
    assert max(spy.nbytes) <= 4 * max(rows * vocab, vocab * hidden_size) < 4 * tokens * vocab
    assert (rows, vocab) in spy.shapes and (tokens - rows, vocab) in spy.shapes  # the two chunks


def test_chunk_rule():
    # ceil(T * Hd / V) (a chunk the size of the hidden input), rounded up to a multiple of 16
    assert chunk_rows(8192, 4096, 128256) == 272  # 261.6 -> 272
    assert chunk_rows(8192, 4096, 32000) == 1056  # 1048.6 -> 1056
    assert chunk_rows(16384, 4096, 32768) == 2048  # exact
    assert chunk_rows(2048, 256, 32000) == MIN_CHUNK_ROWS  # the floor keeps the weight-gradient GEMM efficient
    assert chunk_rows(100, 8, 1000) == 100  # never more than T
    assert chunk_rows(0, 8, 1000) == 1


# --- errors -----------------------------------------------------------------------------------------------


def test_errors_name_the_bad_input():
    hidden, weight, bias, targets, tg = make(4, 8, 10, [0, 1, 0, 1], bias=True)

    def call(**kw):
        args = dict(hidden=hidden, weight=weight, targets=targets, target_group=tg, num_groups=2, bias=bias)
        args.update(kw)
        return fused_linear_cross_entropy(**args)

    cases = [
        (dict(hidden=hidden[None]), r"hidden must be \[tokens, hidden_size\], got shape \(1, 4, 8\)"),
        (dict(weight=weight[:, :5]), r"weight must be \[vocab >= 1, 8\].*\(10, 5\)"),
        (dict(weight=weight[:0]), r"weight must be \[vocab >= 1, 8\]"),
        (dict(bias=bias[:3]), r"bias must be \[10\], got shape \(3,\)"),
        (dict(weight=weight.double()), r"weight has dtype torch.float64; allowed"),
        (dict(weight=weight.half()), r"weight is torch.float16 .* hidden is torch.float32"),
        (dict(targets=targets[:3]), r"targets must be an integer tensor of shape \(4,\)"),
        (dict(targets=targets.float()), r"targets must be an integer tensor"),
        (dict(target_group=tg[None]), r"target_group must be an integer tensor of shape \(4,\)"),
        (dict(targets=torch.tensor([0, 10, 1, 2])), r"target 10 is outside \[0, 10\) and is not the ignore index -100"),
        (dict(targets=torch.tensor([0, -5, 1, 2])), r"target -5 is outside"),
        (dict(target_group=torch.tensor([0, 2, 0, 1])), r"target_group holds 2; allowed: -1 and \[0, 2\)"),
        (dict(target_group=torch.tensor([0, -2, 0, 1])), r"target_group holds -2"),
        (dict(num_groups=0), r"num_groups must be >= 1, got 0"),
        (dict(chunk_size=0), r"chunk_size must be >= 1"),
        (dict(backend="cuda"), r"backend 'cuda' is not one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kwargs)
