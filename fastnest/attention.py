"""Variable-length causal attention over packed sequences: the single place attention backends plug into."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VarlenInfo:
    """Packing computed once per step and handed to every layer (no per-layer host synchronisation)."""

    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1], on the model's device
    seqlens: tuple[int, ...]  # host copy
    max_seqlen: int

    @classmethod
    def from_seqlens(cls, cu_seqlens: torch.Tensor, seqlens: tuple[int, ...], device: torch.device) -> VarlenInfo:
        return cls(cu_seqlens.to(device, non_blocking=True), seqlens, max(seqlens, default=0))


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    info: VarlenInfo,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention inside each packed sequence, never across.

    ``query [1, H, T, d]``, ``key``/``value [1, Hkv, T, d]`` (grouped-query when ``Hkv < H``); returns
    ``[1, T, H, d]``. Runs one SDPA per sequence, so memory stays linear in the packed length.
    """
    total = query.shape[2]
    if sum(info.seqlens) != total:
        raise ValueError(f"sequence lengths sum to {sum(info.seqlens)} but the packed input holds {total} tokens")
    gqa = key.shape[1] != query.shape[1]
    # split (not slicing): its backward is one concatenation instead of a zero-filled full-size gradient per piece
    parts = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
        if q.shape[2]
        else q
        for q, k, v in zip(*(t.split(info.seqlens, dim=2) for t in (query, key, value)))
    ]
    out = torch.cat(parts, dim=2) if parts else query
    return out.transpose(1, 2)
