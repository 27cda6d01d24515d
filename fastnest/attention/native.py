"""native: fastnest._C's packed causal attention (kernels/cpu/attention.cpp; CPU, float32, the CPU default).

One kernel call per layer over every sequence, forward and backward: each block of query rows computes its scores
up to its own last visible key only (torch's CPU SDPA computes whole 512-key blocks, so a causal sequence of up to
512 keys costs it a full square), and the keys of a sequence with a context are read through their packed rows
instead of a gather. The backward recomputes the probabilities from the saved log-sum-exp.
"""

from __future__ import annotations

import itertools

import torch

from ..ops.native_common import extension

OPTIONS = frozenset({"sliding_window"})
TAIL_QUERIES = True  # bottom-right aligned by construction: a tail block sees its keys as a continuation does


def prepare(info, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """The kernel's int64 offsets of queries and keys, the row of every key position, and the rows of the key
    tensors when positions are gathered rows (None when the positions are the rows)."""
    cu_q, cu_k = (
        torch.tensor((0, *itertools.accumulate(n)), dtype=torch.long) for n in (info.seqlens_q, info.seqlens_k)
    )
    if info.key_index is None:
        return cu_q, cu_k, torch.arange(info.total, device=device), None
    return cu_q, cu_k, info.key_index.long().contiguous(), info.total if info.key_rows is None else info.key_rows


def _heads_contiguous(t: torch.Tensor) -> bool:
    """Each token's ``[H, d]`` contiguous, any token stride (a single head's stride is never used)."""
    return t.dim() == 3 and t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])


def _rows_major(t: torch.Tensor) -> torch.Tensor:
    """``[T, H, d]`` as the kernel reads it (``_heads_contiguous``)."""
    return t if _heads_contiguous(t) else t.contiguous()


def _check(q, k, v, rows, cu_q, cu_k) -> None:
    """What the kernel trusts: dtypes, layouts, and every offset and key row inside the tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not _heads_contiguous(t):
            raise ValueError(
                f"{name} must be float32 [T, H, d] on CPU with each token's heads contiguous, got {t.dtype} "
                f"{tuple(t.shape)} with strides {t.stride()} on {t.device}"
            )
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with q's head dim {q.shape[2]}")
    for name, t in (("rows", rows), ("cu_q", cu_q), ("cu_k", cu_k)):
        if t.dtype != torch.long or t.device.type != "cpu" or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous 1-D int64 on CPU, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if len(cu_q) < 2 or len(cu_k) != len(cu_q) or cu_q[0] != 0 or cu_k[0] != 0:
        raise ValueError(f"cu_q {cu_q.tolist()} and cu_k {cu_k.tolist()} must be offsets from 0, one per sequence")
    if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) != len(rows):
        raise ValueError(
            f"the offsets end at {int(cu_q[-1])} queries and {int(cu_k[-1])} keys; q has {q.shape[0]} and rows "
            f"{len(rows)}"
        )
    if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < k.shape[0]:
        raise ValueError(f"key rows must lie in [0, {k.shape[0]}), got [{int(rows.min())}, {int(rows.max())}]")


# Torch custom ops (not bare extension calls) so that dispatch modes (bench/flop_count.py) and torch.compile see
# them; the key rows and offsets are int64 CPU tensors, window 0 is none.
@torch.library.custom_op("fastnest::attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    scale: float, window: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    _check(q, k, v, rows, cu_q, cu_k)
    tokens, heads, dim = q.shape
    out, lse = q.new_empty(tokens, heads, dim), q.new_empty(tokens, heads)
    extension().attention_forward(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), rows.data_ptr(),
        cu_q.data_ptr(), cu_k.data_ptr(), len(cu_q) - 1, heads, k.shape[1], dim, scale, window,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out, lse


@_forward.register_fake
def _(q, k, v, rows, cu_q, cu_k, scale, window):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2])


@torch.library.custom_op("fastnest::attention_backward", mutates_args=())
def _backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rows: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq, and dk/dv per key position ``[len(rows), Hkv, d]``."""
    _check(q, k, v, rows, cu_q, cu_k)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:2]:
        shapes = "/".join(str(tuple(t.shape)) for t in (dout, out, lse))
        raise ValueError(f"dout/out/lse shapes {shapes} do not match q's {tuple(q.shape)}")
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (dout, out, lse)):
        raise ValueError("dout, out and lse must be contiguous float32 (the kernel reads them densely)")
    dq = torch.empty_like(out)
    dk, dv = (k.new_empty(len(rows), k.shape[1], k.shape[2]) for _ in range(2))
    extension().attention_backward(
        dout.data_ptr(), q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        out.data_ptr(), lse.data_ptr(), rows.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr(), len(cu_q) - 1,
        q.shape[1], k.shape[1], q.shape[2], scale, window, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, rows, cu_q, cu_k, scale, window):
    return out.new_empty(out.shape), *(k.new_empty(len(rows), *k.shape[1:]) for _ in range(2))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prepared, scale, window):
        cu_q, cu_k, rows, key_rows = prepared
        q, k, v = (_rows_major(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, rows, cu_q, cu_k, scale, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prepared, ctx.scale, ctx.window = prepared, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        cu_q, cu_k, rows, key_rows = ctx.prepared
        dq, dk, dv = _backward(dout.contiguous(), *ctx.saved_tensors, rows, cu_q, cu_k, ctx.scale, ctx.window)
        if key_rows is not None:  # one slot per key position: a row that several sequences read sums theirs
            dk, dv = (dk.new_zeros(key_rows, *dk.shape[1:]).index_add_(0, rows, g) for g in (dk, dv))
        return dq, dk, dv, None, None, None


def attend(q, k, v, info, scale, dropout, sliding_window: int | None = None) -> torch.Tensor:
    if dropout:
        raise ValueError(f"attention 'native' has no dropout, got dropout={dropout}; use attention='sdpa'")
    if q.dtype != torch.float32:
        raise ValueError(f"attention 'native' takes float32, got {q.dtype}; use attention='sdpa'")
    if q.shape[2] % 8:
        raise ValueError(
            f"attention 'native' needs a head dim that is a multiple of 8, got {q.shape[2]}; use attention='sdpa'"
        )
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(q, k, v, info.prepared, scale, sliding_window or 0)
