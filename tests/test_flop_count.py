"""bench/flop_count.py: the step benchmark's FLOP counter against hand counts, and the GEMM replay it feeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.flop_count import FlopCount, gemm_operands, time_gemms
from fastnest.attention import VarlenInfo, varlen_attention
from fastnest.dispatch import native_available


def test_counts_matmuls_forward_and_backward():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with FlopCount() as count:
        F.linear(x, w, b).sum().backward()  # forward addmm 6x4x5; backward dx 6x5x4 and dw 5x6x4
    assert count.gemm_flops == 3 * 2 * 6 * 4 * 5
    assert sum(count.gemms.values()) == 3 and count.attention_flops == 0
    calls = [c for _, _, c in gemm_operands(count.gemms)]
    assert sum(calls) == 3 and time_gemms(gemm_operands(count.gemms)) >= 0


def test_counts_fused_causal_attention_as_useful_work():
    q, k, v = (torch.randn(1, 2, 7, 4, requires_grad=True) for _ in range(3))
    with FlopCount() as count:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    forward = 2 * 2 * 4 * 7 * 7  # QK^T and PV over the causal half: 2 * (2 * H * d * L * L) / 2
    assert count.attention_flops == forward * 3  # backward counted as twice the forward


def test_counts_masked_attention_at_its_visible_pairs():
    # 3 tail queries over 5 keys, bottom-right aligned: 3 + 4 + 5 visible pairs per head
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(2))
    mask = torch.arange(3)[:, None] + 2 >= torch.arange(5)[None, :]
    with FlopCount() as count:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    forward = 4 * 4 * 2 * (3 + 4 + 5)  # QK^T and PV, 2 FLOPs each per (pair, dim), 2 heads
    assert count.attention_flops == forward * 3


@pytest.mark.skipif(not native_available(), reason="fastnest._C is not built")
@pytest.mark.parametrize(
    "tail, window, pairs",
    [
        (False, None, (1 + 2) + (1 + 2 + 3 + 4 + 5)),  # squares of 2 and 5 tokens
        (False, 2, (1 + 2) + (1 + 2 + 2 + 2 + 2)),
        (True, None, 3 + 4 + 5),  # rows 4 and 6 read: the second sequence's last 3 queries over its 5 keys
    ],
)
def test_counts_native_attention_at_its_visible_pairs(tail, window, pairs):
    info = VarlenInfo.from_seqlens((2, 5), backend="native")
    q, k, v = (torch.randn(7, 2, 8, requires_grad=True) for _ in range(3))
    if tail:
        info, _ = info.tail_queries(torch.tensor([4, 6]))
        q = q[info.query_index]
    with FlopCount() as count:
        varlen_attention(q, k, v, info, sliding_window=window).sum().backward()
    assert count.attention_flops == 4 * 8 * 2 * pairs * 3  # 2 heads of dim 8; backward twice the forward
