"""xformers: memory-efficient attention with a block-diagonal causal bias (CUDA)."""

from __future__ import annotations

import torch

from .common import gather_keys, nonempty_offsets

OPTIONS = frozenset()  # no sliding window, softcap or sinks wired to xformers' biases here
TAIL_QUERIES = True  # the bottom-right block-diagonal bias


def prepare(info, device: torch.device):
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask, BlockDiagonalCausalMask

    _, _, q_lens, k_lens = nonempty_offsets(info, device)
    if info.key_index is None:
        return BlockDiagonalCausalMask.from_seqlens(q_lens, device=device)
    return BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_lens, k_lens, device=device)


def attend(q, k, v, info, scale, dropout) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    total, heads, d = q.shape
    kv_heads = k.shape[1]
    k, v = gather_keys(k, v, info)
    if kv_heads == heads:
        q_, k_, v_ = q[None], k[None], v[None]  # [1, T, H, d]
    else:  # grouped-query: xformers' [B, T, groups, heads per group, d] layout, K/V broadcast over a group
        group = heads // kv_heads
        q_ = q.unflatten(1, (kv_heads, group))[None]
        k_, v_ = (t[:, :, None].expand(-1, -1, group, -1)[None] for t in (k, v))
    out = memory_efficient_attention(q_, k_, v_, attn_bias=info.prepared, p=dropout, scale=scale)
    return out.reshape(total, heads, d)
