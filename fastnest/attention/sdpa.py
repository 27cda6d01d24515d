"""sdpa: one ``scaled_dot_product_attention`` per sequence (anywhere; the CPU default when fastnest._C is not built)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

OPTIONS = frozenset({"sliding_window"})  # a window is an explicit mask; softcap and sinks are not SDPA's function
TAIL_QUERIES = True  # a tail block attends under an explicit bottom-right mask


def _visible(n: int, m: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[n, m]`` boolean, bottom-right aligned: query j sees key p iff ``0 <= j + m - n - p < window``."""
    back = torch.arange(n, device=device)[:, None] + (m - n) - torch.arange(m, device=device)[None, :]
    return (back >= 0) & (back < (m + 1 if window is None else window))


def attend(q, k, v, info, scale, dropout, sliding_window: int | None = None) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]

    def run(q_, k_, v_):
        n, m = q_.shape[2], k_.shape[2]
        if n == m and (sliding_window is None or sliding_window >= n):  # a window of the block's size is none
            return F.scaled_dot_product_attention(
                q_, k_, v_, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
            )
        mask = _visible(n, m, sliding_window, q_.device)
        return F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )

    # Each sequence's block is its keys' rows, [context; own] (``info.key_index``), gathered once per tensor:
    # SDPA's is_causal is top-left aligned, and its CPU kernels skip masked blocks only under is_causal, so each
    # block attends as a square and keeps its own rows, which measured faster than an offset mask (the context's
    # rows are a small extra). One gather (its backward one index_add) replaces a concatenation per sequence and
    # the zero-filled gradient of each sliced context. Tail queries (a last layer's few read rows) are the
    # opposite case: their n rows against m keys under a mask cost n*m, the square m*m/2.
    square = info.key_index is not None and info.query_index is None
    if info.key_index is not None:
        k, v = (t.index_select(0, info.key_index) for t in (k, v))
    if square:
        q = q.index_select(0, info.key_index)
    blocks = zip(
        q.split(info.seqlens_k if square else info.seqlens_q), k.split(info.seqlens_k), v.split(info.seqlens_k)
    )
    parts = []
    for block in blocks:
        # [L, H, d] -> [1, H, L, d] views in, the output back to tokens-major: one concatenation makes [T, H, d]
        parts.append(run(*(t.transpose(0, 1)[None] for t in block))[0].transpose(0, 1) if len(block[0]) else block[0])
    out = torch.cat(parts)
    return out if info.prepared is None else out.index_select(0, info.prepared)


def prepare(info, device: torch.device) -> torch.Tensor | None:
    """Rows of the sequences' own queries among the gathered blocks (None when no sequence has a context, or
    when the queries are tails, which are never gathered)."""
    if info.key_index is None or info.query_index is not None:
        return None
    rows = [
        torch.arange(start + m - n, start + m)
        for start, n, m in zip(itertools.accumulate(info.seqlens_k, initial=0), info.seqlens_q, info.seqlens_k)
    ]
    return torch.cat(rows).to(device, non_blocking=True)
