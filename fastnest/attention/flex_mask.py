"""FlexAttention's block mask for packed sequences, built from the sequence lengths without any [T, T] tensor.

``create_block_mask`` evaluates the mask function on every (query, key) pair before blocking (several GB at
~30k packed tokens). Here each sequence's rows are cut at query-block boundaries into segments; the keys a
segment's rows see are at most two intervals (its context, its own tokens up to the row, both clipped by a
sliding window), so which key blocks some row sees (partial or full) and which every row sees whole (full)
follow from interval ends. The block-level tables are ``[num_q_blocks, num_kv_blocks]`` booleans (about
0.06 s to build at 64k tokens on one CPU core, none larger than 1 MiB); the element mask function stays for
the partial blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128  # FlexAttention's default sparse block size (its CUDA kernels tile by it)


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence inside query block ``block``, with the key intervals (half-open) they see."""

    block: int
    any_ranges: tuple[tuple[int, int], ...]  # keys some row of the segment sees
    full_ranges: tuple[tuple[int, int], ...]  # keys every row of the segment sees


def segments(info, window: int | None, block: int) -> list[Segment]:
    """Every (sequence, query block) piece with the key intervals its rows see (token positions, half-open)."""
    starts = [0]
    for n in info.seqlens_q:
        starts.append(starts[-1] + n)
    big = info.total + 1 if window is None else window
    out = []
    for i, n in enumerate(info.seqlens_q):
        if n == 0:
            continue
        st, en, c, before = starts[i], starts[i + 1], info.context[i], info.context_lens[i]
        has_ctx = before > 0
        cs, ce = (starts[c], starts[c] + before) if has_ctx else (0, 0)
        base = ce - cs  # logical position of the sequence's first token (after its context)
        for qb in range(st // block, (en - 1) // block + 1):
            r0, r1 = max(st, qb * block), min(en, (qb + 1) * block)
            # own keys: row r sees [max(st, r - W + 1), r]; context keys: logical index >= lp(r) - W + 1
            any_r = [(max(st, r0 - big + 1), r1)]
            full_r = [(max(st, r1 - big), r0 + 1)]
            if has_ctx:
                any_r.append((cs + max(0, base + r0 - st - big + 1), ce))
                full_r.append((cs + max(0, base + r1 - 1 - st - big + 1), ce))
            out.append(Segment(qb, tuple(any_r), tuple(full_r)))
    return out


def _merged(ranges) -> list[tuple[int, int]]:
    """Half-open intervals with touching or overlapping ones joined (a context ending where its sequence
    starts covers the block across the seam)."""
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def block_tables(info, window: int | None, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` boolean ``[num_q_blocks, num_kv_blocks]``: blocks some (but not every) row-key
    pair of is visible, and blocks wholly visible. A block running past the end is never full."""
    total = info.total
    nb = -(-total // block)
    seen = torch.zeros(nb, nb, dtype=torch.bool)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    full_ok = torch.zeros(nb, dtype=torch.bool)  # query blocks whose rows all exist
    full_ok[: total // block] = True
    first = torch.ones(nb, dtype=torch.bool)
    for seg in segments(info, window, block):
        for lo, hi in seg.any_ranges:
            if hi > lo:
                seen[seg.block, lo // block : (hi - 1) // block + 1] = True
        row = torch.zeros(nb, dtype=torch.bool)
        for lo, hi in _merged(seg.full_ranges):
            a, b = -(-lo // block), hi // block  # key blocks wholly inside [lo, hi)
            if b > a:
                row[a:b] = True
        full[seg.block] = row if first[seg.block] else full[seg.block] & row
        first[seg.block] = False
    full &= full_ok[:, None]
    return seen & ~full, full


def _ordered(table: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's ``(num_blocks [1, 1, R], indices [1, 1, R, C])`` of a boolean ``[R, C]`` table: each row's
    listed blocks first, ascending (then the others; only the first ``num_blocks`` are read)."""
    cols = torch.arange(table.shape[-1], dtype=torch.int32)
    counts = table.sum(-1, dtype=torch.int32)
    # unique sort keys (listed columns below the others): a plain sort, ~10x faster than a stable argsort
    order = torch.where(table, cols, cols + table.shape[-1]).sort(dim=-1).values % table.shape[-1]
    return counts[None, None].to(device), order[None, None].to(device)


@dataclass(frozen=True)
class Positions:
    """Per packed position (padded past the end with values that match nothing): its sequence, its
    sequence's context (-1: none), where the context's tokens it continues end, and its logical position
    (offset after them)."""

    seq: torch.Tensor
    ctx: torch.Tensor
    ctx_end: torch.Tensor
    logical: torch.Tensor

    @classmethod
    def of(cls, info, device: torch.device, pad: int = BLOCK) -> Positions:
        lengths = torch.tensor(info.seqlens_q, dtype=torch.int64)
        ids = torch.arange(len(lengths)).repeat_interleave(lengths)
        context = torch.tensor(info.context, dtype=torch.int64)
        base = torch.tensor(info.context_lens, dtype=torch.int64)
        ctx = torch.where(base > 0, context, -1)[ids]
        starts = torch.cumsum(lengths, 0) - lengths
        ctx_end = (starts[context.clamp(min=0)] + base)[ids]
        logical = torch.arange(info.total) - starts[ids] + base[ids]
        zeros = torch.zeros(pad, dtype=torch.int64)
        return cls(
            torch.cat([ids, torch.full((pad,), -2)]).to(device),
            torch.cat([ctx, torch.full((pad,), -3)]).to(device),
            torch.cat([ctx_end, zeros]).to(device),
            torch.cat([logical, zeros]).to(device),
        )


def mask_function(pos: Positions, window: int | None):
    """The element mask (evaluated on partial blocks only): own keys up to the query, the context's tokens the
    sequence continues, and with a window only keys less than ``window`` logical positions back."""
    seq, ctx, ctx_end, logical = pos.seq, pos.ctx, pos.ctx_end, pos.logical

    def document(b, h, q_idx, kv_idx):
        own = (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)
        # a context lies wholly before its sequences: every token of it up to the continued ones
        return own | ((ctx[q_idx] == seq[kv_idx]) & (kv_idx < ctx_end[q_idx]))

    if window is None:
        return document

    def windowed(b, h, q_idx, kv_idx):
        return document(b, h, q_idx, kv_idx) & (logical[q_idx] - logical[kv_idx] < window)

    return windowed


def build_block_mask(info, device: torch.device, window: int | None = None, block: int = BLOCK):
    """The ``BlockMask`` of ``info``'s packing (and window) on ``device``.

    Both sides come from the block tables: the key-block lists of each query block (what
    ``BlockMask.from_kv_blocks`` takes) and the query-block lists of each key block (the backward's), the
    transposed tables ordered the same way; ``from_kv_blocks`` would rebuild the latter through a dense int32
    table and a stable argsort (~0.2 s at 64k tokens).
    """
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = block_tables(info, window, block)
    kv_num, kv_idx = _ordered(partial, device)
    full_num, full_idx = _ordered(full, device)
    q_num, q_idx = _ordered(partial.T, device)
    full_q_num, full_q_idx = _ordered(full.T, device)
    return BlockMask(
        (info.total, info.total),
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        q_num,
        q_idx,
        full_q_num,
        full_q_idx,
        BLOCK_SIZE=(block, block),
        mask_mod=mask_function(Positions.of(info, device, pad=block), window),
    )
