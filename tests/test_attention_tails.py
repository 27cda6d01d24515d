"""Tail queries (``VarlenInfo.tail_queries``): a last layer's attention at the read rows' tails only, against the
float64 reference over every query, then those rows taken.

sdpa and native run forward and backward here; flash and xformers need CUDA (skipped without it); flex has no tails.
"""

import pytest
import torch

from fastnest.attention import varlen_attention
from fastnest.attention.naive import reference_attention
from tests.test_attention import PARAMS, backend_or_skip, info_for, make_qkv

# (seqlens, context, context_lens, rows read): rows anywhere in a sequence, unsorted, repeated, none in some
# sequences (they keep no key), in a context (a shared prefix read by its last token)
CASES = [
    ((7,), None, None, (6,)),
    ((7,), None, None, (0, 6)),
    ((3, 5), None, None, (7, 4, 5)),
    ((4, 0, 6), None, None, (9, 1, 9)),
    ((2, 6, 1, 3), None, None, (8,)),
    ((3, 4, 5), (-1, 0, 0), None, (6, 11, 2, 9)),
    ((3, 0, 5, 2, 1, 4), (-1, 0, 0, -1, 3, 3), None, (7, 10, 12, 13, 14)),
    ((6, 2, 3, 4), (-1, 0, 0, 0), (0, 6, 1, 4), (7, 10, 12, 14, 5)),
]
PARAMS = [p for p in PARAMS if p.values[0] != "flex"]


def _reads(seqlens, context, context_lens, rows, backend, device):
    info = info_for(seqlens, context, backend, device, context_lens)
    tail, picks = info.tail_queries(torch.tensor(rows))
    return tail, picks


@pytest.mark.parametrize("backend, device, dtype, tol", PARAMS)
@pytest.mark.parametrize("seqlens, context, context_lens, rows", CASES)
@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2)])
def test_tails_match_every_query_at_the_read_rows(
    backend, device, dtype, tol, seqlens, context, context_lens, rows, h, hkv
):
    backward = backend != "flex"
    backend_or_skip(backend, device, dtype, backward=backward)
    t, d = sum(seqlens), 16
    q, k, v = make_qkv(t, h, hkv, d, seed=t + len(rows), dtype=dtype, device=device)
    w = torch.randn(len(rows), h, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tail, picks = _reads(seqlens, context, context_lens, rows, backend, device)
    got = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = varlen_attention(got[0].index_select(0, tail.query_index), *got[1:], tail, scale=0.3)[picks]
    want = [x.cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = reference_attention(*want, seqlens, context, scale=0.3, context_lens=context_lens)[list(rows)]
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=tol, atol=tol)
    (out.cpu().double() * w).sum().backward()
    (ref * w).sum().backward()
    for name, a, b in zip("qkv", got, want):
        scale = max(b.grad.abs().max().item(), 1.0)  # a query with one key has no gradient, up to rounding
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=tol, atol=tol * scale, msg=name)


def test_tails_hold_each_sequence_from_its_first_read_row_and_only_the_keys_they_see():
    # sequences at 0..2, 3..7, 8..11 of which the second continues the first; rows in the second and third only
    tail, picks = _reads((3, 5, 4), (-1, 0, -1), None, (10, 5, 7, 9), "sdpa", "cpu")
    assert tail.seqlens_q == (0, 3, 3) and tail.seqlens_k == (0, 8, 4)
    assert tail.query_index.tolist() == [5, 6, 7, 9, 10, 11]
    assert tail.key_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert picks.tolist() == [4, 0, 2, 3]
    assert tail.key_rows == 12 and tail.total == 6


def test_sliding_window_on_tails():
    seqlens, rows, window = (9, 6), (7, 8, 13), 3
    q, k, v = make_qkv(15, 2, 2, 8, seed=2)
    tail, picks = _reads(seqlens, None, None, rows, "sdpa", "cpu")
    with torch.no_grad():
        out = varlen_attention(q[tail.query_index], k, v, tail, sliding_window=window)[picks]
    want = reference_attention(q, k, v, seqlens, sliding_window=window)[list(rows)]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_errors_name_the_bad_input():
    info = info_for((3, 4))
    with pytest.raises(ValueError, match=r"rows must be packed positions in \[0, 7\), got \[7\]"):
        info.tail_queries(torch.tensor([2, 7]))
    tail, _ = info.tail_queries(torch.tensor([2, 6]))
    with pytest.raises(ValueError, match="tails already"):
        tail.tail_queries(torch.tensor([0]))
    q, k, v = make_qkv(7, 2, 2, 8, seed=1)
    with pytest.raises(ValueError, match="sum to 2 queries of 7 keys but query/key/value hold 7/7/7"):
        varlen_attention(q, k, v, tail)
    with pytest.raises(
        ValueError, match=r"'flex' has no tail queries; backends that do: \('flash', 'xformers', 'native', 'sdpa'\)"
    ):
        info_for((3, 4), backend="flex").tail_queries(torch.tensor([2]))
