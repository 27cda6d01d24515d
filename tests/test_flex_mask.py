"""The flex block mask built from the sequence lengths (fastnest.attention.flex_mask): element for element the
visibility of the naive reference's rule, block for block what the dense ``create_block_mask`` builds, and no
[T, T] tensor while building it (T = 65536)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from fastnest.attention import VarlenInfo
from fastnest.attention.flex_mask import Positions, build_block_mask, mask_function
from tests.test_attention import CASES, PARTIAL

WINDOWS = [None, 1, 2, 3, 6]


def reference_visibility(seqlens, context, window=None, context_lens=None) -> torch.Tensor:
    """``[T, T]`` booleans from the naive reference's rule, written out per sequence: query j of n sees key m of
    its M keys (the context's first ``context_lens[i]``, default all, then its own) iff 0 <= j + M - n - m < W."""
    t = sum(seqlens)
    context = context or [-1] * len(seqlens)
    starts = [sum(seqlens[:i]) for i in range(len(seqlens))]
    out = torch.zeros(t, t, dtype=torch.bool)
    for i, n in enumerate(seqlens):
        c = context[i]
        own = list(range(starts[i], starts[i] + n))
        before = (seqlens[c] if context_lens is None else context_lens[i]) if c >= 0 else 0
        keys = list(range(starts[c], starts[c] + before)) + own
        m = len(keys)
        for j in range(n):
            for idx, key in enumerate(keys):
                back = j + m - n - idx
                out[starts[i] + j, key] = 0 <= back < (window or t + 1)
    return out


def table(num: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """A BlockMask's (num_blocks, indices) pair as a boolean [Q blocks, KV blocks] table."""
    out = torch.zeros(num.shape[-1], kv_blocks, dtype=torch.bool)
    for row, (n, idx) in enumerate(zip(num[0, 0].tolist(), indices[0, 0])):
        out[row, idx[:n].long()] = True
    return out


def tables(mask) -> tuple[torch.Tensor, torch.Tensor]:
    kv_blocks = mask.kv_indices.shape[-1]
    return table(mask.kv_num_blocks, mask.kv_indices, kv_blocks), table(
        mask.full_kv_num_blocks, mask.full_kv_indices, kv_blocks
    )


def q_tables(mask) -> tuple[torch.Tensor, torch.Tensor]:
    q_blocks = mask.q_indices.shape[-1]
    return table(mask.q_num_blocks, mask.q_indices, q_blocks), table(
        mask.full_q_num_blocks, mask.full_q_indices, q_blocks
    )


def expand(mask, block: int, total: int) -> torch.Tensor:
    """The [T, T] visibility a kernel computes from the block mask: full blocks all visible, partial blocks by
    the mask function, every other block skipped."""
    partial, full = tables(mask)
    q = torch.arange(total)[:, None].expand(total, total)
    kv = torch.arange(total)[None, :].expand(total, total)
    qb, kb = q // block, kv // block
    zero = torch.zeros((), dtype=torch.int64)
    elementwise = mask.mask_mod(zero, zero, q, kv)
    return full[qb, kb] | (partial[qb, kb] & elementwise)


@pytest.mark.parametrize("block", [2, 4, 128])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens, context", [c for c in CASES if sum(c[0]) > 0])
def test_block_mask_is_the_reference_visibility(seqlens, context, window, block):
    info = VarlenInfo.from_seqlens(seqlens, context)
    mask = build_block_mask(info, torch.device("cpu"), window, block)
    assert mask.shape[-2:] == (info.total, info.total) and mask.BLOCK_SIZE == (block, block)
    torch.testing.assert_close(expand(mask, block, info.total), reference_visibility(seqlens, context, window))


@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens, context, context_lens", PARTIAL)
def test_block_mask_with_partial_contexts(seqlens, context, context_lens, window, block):
    info = VarlenInfo.from_seqlens(seqlens, context, context_lens=context_lens)
    mask = build_block_mask(info, torch.device("cpu"), window, block)
    want = reference_visibility(seqlens, context, window, context_lens)
    torch.testing.assert_close(expand(mask, block, info.total), want)
    fn = mask_function(Positions.of(info, torch.device("cpu"), pad=block), window)
    dense = create_block_mask(fn, None, None, info.total, info.total, device="cpu", BLOCK_SIZE=block)
    for got, exact, name in zip(tables(mask), tables(dense), ("partial", "full")):
        torch.testing.assert_close(got, exact, msg=name)


@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlens, context", [c for c in CASES if sum(c[0]) > 0])
def test_block_tables_equal_the_dense_build(seqlens, context, window, block):
    """Same partial and full blocks as ``create_block_mask`` over the same element mask (which evaluates it on
    every [T, T] pair): the tables are exact, not merely a superset."""
    info = VarlenInfo.from_seqlens(seqlens, context)
    mine = build_block_mask(info, torch.device("cpu"), window, block)
    fn = mask_function(Positions.of(info, torch.device("cpu"), pad=block), window)
    dense = create_block_mask(fn, None, None, info.total, info.total, device="cpu", BLOCK_SIZE=block)
    for got, want, name in zip(tables(mine), tables(dense), ("partial", "full")):
        torch.testing.assert_close(got, want, msg=name)
    for got, want, name in zip(q_tables(mine), q_tables(dense), ("partial", "full")):  # the backward's side
        torch.testing.assert_close(got, want, msg=f"{name}, by key block")
        assert torch.equal(got, tables(mine)[name == "full"].T)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def packing(total: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Random sequence lengths summing to ``total``, every third sequence continuing the one before it."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(int(torch.randint(20, 400, (1,), generator=g)), total - sum(lens)))
    context = [i - 1 if i % 3 == 2 else -1 for i in range(len(lens))]
    return lens, context


def test_spy_sees_the_dense_builds_square_tensor():
    t = 1024
    lens, context = packing(t)
    info = VarlenInfo.from_seqlens(lens, context)
    fn = mask_function(Positions.of(info, torch.device("cpu")), None)
    with LargestTensor() as spy:
        create_block_mask(fn, None, None, t, t, device="cpu")
    assert spy.largest >= t * t  # at least one [T, T] boolean


@pytest.mark.parametrize("window", [None, 64])
def test_no_square_tensor_at_64k_tokens(window):
    t = 65536
    lens, context = packing(t)
    info = VarlenInfo.from_seqlens(lens, context)
    with LargestTensor() as spy:
        mask = build_block_mask(info, torch.device("cpu"), window)
    assert spy.largest < 4 * 2**20, spy.largest  # < 4 MiB; the dense build's [T, T] mask alone is 4 GiB
    assert mask.shape[-2:] == (t, t)
    # spot-check rows against the rule: each sampled query's visible keys
    partial, full = tables(mask)
    starts = torch.tensor([0, *lens]).cumsum(0)
    for i in (0, 2, len(lens) - 1):
        q = int(starts[i + 1]) - 1  # the sequence's last token
        kv = torch.arange(t)
        blocks = (full | partial)[q // 128][kv // 128]
        seen = blocks & (full[q // 128][kv // 128] | mask.mask_mod(0, 0, torch.tensor(q), kv))
        own = (kv >= starts[i]) & (kv <= q)
        ctx = (kv >= starts[i - 1]) & (kv < starts[i]) if context[i] >= 0 else torch.zeros(t, dtype=torch.bool)
        want = own | ctx
        if window is not None:
            keys = torch.cat([kv[ctx], kv[own]])
            want = torch.zeros(t, dtype=torch.bool)
            want[keys[-window:]] = True
        assert torch.equal(seen, want), i
