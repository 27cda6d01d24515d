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
    gqa = key.shape[1] != query.shape[1]
    parts, start = [], 0
    for length in info.seqlens:
        span = slice(start, start + length)
        parts.append(
            F.scaled_dot_product_attention(
                query[:, :, span], key[:, :, span], value[:, :, span],
                dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa,
            )
            if length
            else query[:, :, span]
        )
        start += length
    return torch.cat(parts, dim=2).transpose(1, 2)
