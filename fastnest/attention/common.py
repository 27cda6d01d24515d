"""Helpers of the backends that run one kernel over the whole packed stream (flash, xformers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..packing import cumulative_lengths

if TYPE_CHECKING:
    from .varlen import VarlenInfo


def gather_keys(k: torch.Tensor, v: torch.Tensor, info: VarlenInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values (its context's, then its own) when some sequence has a context; the
    gather's backward sums a context's gradients over every sequence that read it."""
    if info.key_index is None:
        return k, v
    return k.index_select(0, info.key_index), v.index_select(0, info.key_index)


def nonempty_offsets(info: VarlenInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Offsets over the sequences that have tokens (empty ones take no positions, so dropping them is free)."""
    q_lens = [n for n in info.seqlens_q if n]
    k_lens = [m for n, m in zip(info.seqlens_q, info.seqlens_k) if n]
    cu_q, cu_k = (cumulative_lengths(lens).to(device, non_blocking=True) for lens in (q_lens, k_lens))
    return cu_q, cu_k, q_lens, k_lens
