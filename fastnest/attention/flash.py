"""flash: FlashAttention's varlen kernel over ``[T, H, d]`` (CUDA, fp16/bf16, sm80+; any token/head strides)."""

from __future__ import annotations

import torch

from .common import gather_keys, nonempty_offsets

OPTIONS = frozenset({"sliding_window", "softcap"})  # flash-attn 2's window_size and softcap (>= 2.6)
TAIL_QUERIES = True  # its varlen causal mask is bottom-right aligned, a tail query sees its keys as a continuation does


def prepare(info, device: torch.device):
    cu_q, cu_k, _, _ = nonempty_offsets(info, device)
    return cu_q, cu_k


def attend(q, k, v, info, scale, dropout, sliding_window: int | None = None, softcap: float | None = None):
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_k = info.prepared
    k, v = gather_keys(k, v, info)
    # flash's causal mask is bottom-right aligned when query and key lengths differ (flash-attn >= 2.1); its
    # window (left, right) keeps keys i - left .. i + right of that alignment: W keys up to itself = (W - 1, 0)
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        info.max_seqlen_q,
        info.max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
        window_size=window,
        softcap=0.0 if softcap is None else float(softcap),
    )
