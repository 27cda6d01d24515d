"""Packing variable-length sequences into one row (the Matryoshka plan over them is in ``fastnest.plan``).

Everything here works on plain tensors (no Hugging Face types), so other LMM code can build its packed
batch with it. Index tensors are built on the CPU: the plan needs the placeholder layout on the host once
per step anyway, and the attention backends want host-side sequence lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .constants import IGNORE_INDEX


@dataclass(frozen=True)
class PackedSequences:
    """Several sequences laid end to end, with what attention and the loss need to keep them apart.

    ``source_index[p]`` says which row of a caller-provided source tensor is packed position ``p``;
    ``logit_index`` lists the packed positions whose logits predict ``targets`` (next token, never across
    a sequence boundary); ``target_group`` is the loss group of each target (``-1`` counts towards every
    group).

    A sequence may have a *context*: an earlier sequence whose leading tokens it continues (a shared prefix,
    packed once). ``context[i]`` is that sequence's index (``-1``: none) and ``context_lens[i]`` how many of
    its first tokens sequence ``i`` continues (all of them unless told otherwise; fewer when the context is
    the longest of nested prefixes, e.g. a query transformer's first m of M image tokens); sequence ``i``'s
    positions continue after them, and its keys are those tokens followed by its own (``key_index``: the
    packed position of every key, sequence by sequence, ``None`` when no sequence has a context;
    ``cu_seqlens_k`` and ``seqlens_k`` delimit them). Queries stay the sequence's own tokens.
    """

    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1]
    seqlens: tuple[int, ...]
    position_ids: torch.Tensor  # int64 [total], restarting per sequence (after its context)
    source_index: torch.Tensor  # int64 [total]
    logit_index: torch.Tensor  # int64 [num_targets]
    targets: torch.Tensor  # int64 [num_targets]
    target_group: torch.Tensor  # int64 [num_targets]
    context: tuple[int, ...]
    context_lens: tuple[int, ...]  # 0 where a sequence has no context
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1]
    seqlens_k: tuple[int, ...]
    key_index: torch.Tensor | None  # int64 [sum(seqlens_k)]

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens, default=0)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.seqlens_k, default=0)

    @property
    def total(self) -> int:
        return int(self.source_index.numel())

    def to(self, device: torch.device | str) -> PackedSequences:
        move = {k: getattr(self, k).to(device, non_blocking=True) for k in _TENSOR_FIELDS}
        key_index = None if self.key_index is None else self.key_index.to(device, non_blocking=True)
        return replace(self, key_index=key_index, **move)


_TENSOR_FIELDS = (
    "cu_seqlens",
    "position_ids",
    "source_index",
    "logit_index",
    "targets",
    "target_group",
    "cu_seqlens_k",
)


def cumulative_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32: the offsets (``cu_seqlens``) of sequences laid end to end."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return cu


def ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(a, a + n) for a, n in zip(starts, lengths)])`` (int64) without a loop over the ranges."""
    starts, lengths = starts.long(), lengths.long()
    offsets = torch.cumsum(lengths, 0) - lengths  # where each range starts in the output
    return torch.arange(int(lengths.sum())) + (starts - offsets).repeat_interleave(lengths)


def check_context(
    context: Sequence[int], seqlens: Sequence[int], context_lens: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate per-sequence contexts (``-1`` or an EARLIER sequence that has no context itself) and how many
    of its leading tokens each continues (default: all); returns ``(context, context_lens)``."""
    num_seqs = len(seqlens)
    context = tuple(int(c) for c in context)
    if len(context) != num_seqs:
        raise ValueError(f"got {len(context)} contexts for {num_seqs} sequences")
    for i, c in enumerate(context):
        if not (c == -1 or 0 <= c < i) or (c >= 0 and context[c] != -1):
            raise ValueError(
                f"context[{i}] = {c}: a context must be -1 or an earlier sequence (< {i}) without a context itself"
            )
    full = tuple(int(seqlens[c]) if c >= 0 else 0 for c in context)
    if context_lens is None:
        return context, full
    lens = tuple(int(n) for n in context_lens)
    if len(lens) != num_seqs:
        raise ValueError(f"got {len(lens)} context lengths for {num_seqs} sequences")
    for i, (n, most) in enumerate(zip(lens, full)):
        if not 0 <= n <= most:
            raise ValueError(
                f"context_lens[{i}] = {n}: a sequence continues 0 to {most} tokens of its context "
                f"(context[{i}] = {context[i]})"
            )
    return context, lens


def key_layout(
    seqlens: Sequence[int], context: Sequence[int] | None = None, context_lens: Sequence[int] | None = None
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]:
    """Keys of every sequence: the tokens of its context it continues, then its own (a sequence without tokens
    has no keys).

    Returns ``(seqlens_k, cu_seqlens_k, key_index)``; ``key_index`` (packed position of each key) is None
    when no sequence has a context, i.e. when the keys are the queries.
    """
    context, lens = check_context(context if context is not None else [-1] * len(seqlens), seqlens, context_lens)
    read = [length if n > 0 else 0 for n, length in zip(seqlens, lens)]
    if not any(read):
        return tuple(seqlens), cumulative_lengths(seqlens), None
    cu = cumulative_lengths(seqlens).long()
    own = torch.tensor(seqlens, dtype=torch.long)
    context_start = cu[torch.tensor(context, dtype=torch.long).clamp(min=0)]
    # each sequence's keys: the span of its context it continues (read[i] tokens), then its own tokens
    starts = torch.stack([context_start, cu[:-1]], 1).flatten()
    lengths = torch.stack([torch.tensor(read, dtype=torch.long), own], 1).flatten()
    seqlens_k = tuple(n + r for n, r in zip(seqlens, read))
    return seqlens_k, cumulative_lengths(seqlens_k), ranges(starts, lengths)


def pack_sequences(
    sources: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | None = None,
    groups: Sequence[int] | None = None,
    context: Sequence[int] | None = None,
    context_lens: Sequence[int] | None = None,
) -> PackedSequences:
    """Pack sequences given as 1-D source-row indices, with per-position labels (``-100`` = none).

    Labels are aligned with positions as in Hugging Face: the logits at position ``p`` predict ``labels[p + 1]``.
    ``context``/``context_lens`` (see :class:`PackedSequences`): a sequence with a context continues its first
    ``context_lens[i]`` tokens, so the last of them predicts the sequence's first label; those targets (one per
    such sequence) come after all others.
    """
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"got {len(labels)} label tensors for {len(sources)} sequences")
    if groups is not None and len(groups) != len(sources):
        raise ValueError(f"got {len(groups)} groups for {len(sources)} sequences")
    seqlens = tuple(int(s.numel()) for s in sources)
    ctx, ctx_lens = check_context(context if context is not None else [-1] * len(seqlens), seqlens, context_lens)
    if labels is not None:
        for i, (length, lab) in enumerate(zip(seqlens, labels)):
            if lab.numel() != length:
                raise ValueError(f"sequence {i} has {length} positions but {lab.numel()} labels")
    lengths = torch.tensor(seqlens, dtype=torch.int64)
    cu = cumulative_lengths(seqlens)
    total = int(cu[-1])
    starts = (cu[:-1].long() - torch.tensor(ctx_lens, dtype=torch.int64)).repeat_interleave(lengths)
    position_ids = torch.arange(total) - starts
    source_index = torch.cat([s.long() for s in sources]) if sources else torch.zeros(0, dtype=torch.long)
    seqlens_k, cu_k, key_index = key_layout(seqlens, ctx, ctx_lens)
    keys = {"context": ctx, "context_lens": ctx_lens, "cu_seqlens_k": cu_k, "seqlens_k": seqlens_k}
    keys["key_index"] = key_index
    if labels is None:
        empty = torch.zeros(0, dtype=torch.long)
        return PackedSequences(cu, seqlens, position_ids, source_index, empty, empty, empty, **keys)
    flat = torch.cat([lab.long() for lab in labels]) if labels else torch.zeros(0, dtype=torch.long)
    next_label = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    next_label[:-1] = flat[1:]
    ends = cu[1:].long()[lengths > 0] - 1
    next_label[ends] = IGNORE_INDEX  # the last token of a sequence predicts nothing (within it)
    logit_index = (next_label != IGNORE_INDEX).nonzero().squeeze(1)
    group_of = torch.tensor(groups if groups is not None else [0] * len(seqlens), dtype=torch.long)
    target_group = group_of.repeat_interleave(lengths)[logit_index]
    targets = next_label[logit_index]
    # across a context: the last token continued predicts the first label of the sequence continuing it
    across = [i for i, n in enumerate(ctx_lens) if n and seqlens[i] and flat[cu[i]] != IGNORE_INDEX]
    if across:
        pick = torch.tensor(across)
        last = [int(cu[ctx[i]]) + ctx_lens[i] - 1 for i in across]
        logit_index = torch.cat([logit_index, torch.tensor(last, dtype=torch.long)])
        targets = torch.cat([targets, flat[cu[:-1].long()[pick]]])
        target_group = torch.cat([target_group, group_of[pick]])
    return PackedSequences(cu, seqlens, position_ids, source_index, logit_index, targets, target_group, **keys)


def pad_packed(packed: PackedSequences, pad_index: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay packed sequences out as padded rows.

    Returns ``(source_index [n, width], attention_mask [n, width], where [total])``: ``where[p]`` is the flat
    index into ``[n * width]`` that packed position ``p`` lands on (so ``where[packed.logit_index]`` finds
    the logits that predict ``packed.targets``). Sequences must stand alone (no context).
    """
    if any(c >= 0 for c in packed.context):
        raise ValueError("pad_packed lays out sequences that stand alone; plan with share_prefix=False")
    lengths = torch.tensor(packed.seqlens, dtype=torch.long)
    n, width = lengths.numel(), packed.max_seqlen
    seq = torch.arange(n).repeat_interleave(lengths)
    col = packed.position_ids + ((width - lengths)[seq] if left else 0)
    where = seq * width + col
    index = torch.full((n * width,), pad_index, dtype=torch.long)
    index[where] = packed.source_index
    mask = torch.zeros(n * width, dtype=torch.long)
    mask[where] = 1
    return index.view(n, width), mask.view(n, width), where
