"""flex: PyTorch FlexAttention with a document mask over the packed stream (no gather: contexts are found
where they lie). Forward anywhere, backward on CUDA only."""

from __future__ import annotations

import functools

import torch


def prepare(info, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    total = info.total
    lengths = torch.tensor(info.seqlens_q, dtype=torch.int64)
    ids = torch.arange(len(lengths)).repeat_interleave(lengths)
    # per position: its sequence, and its sequence's context (-1: none); padded past the end with values that
    # match nothing, in case the kernel evaluates the mask on a partial last block
    pad = 128
    seq = torch.cat([ids, torch.full((pad,), -2)]).to(device)
    ctx = torch.cat([torch.tensor(info.context, dtype=torch.int64)[ids], torch.full((pad,), -3)]).to(device)

    def document(b, h, q_idx, kv_idx):
        own = (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)
        return own | (ctx[q_idx] == seq[kv_idx])  # a context lies wholly before its sequences: all of it

    return create_block_mask(document, None, None, total, total, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attend(q, k, v, info, scale, dropout) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError(f"FlexAttention has no attention dropout (got dropout={dropout}); use another backend")
    # compiled on CUDA (eager flex materialises every score); eager on CPU, where only the forward runs
    run = _compiled_flex() if q.is_cuda else flex_attention
    q_, k_, v_ = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, d] views
    out = run(q_, k_, v_, block_mask=info.prepared, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)
