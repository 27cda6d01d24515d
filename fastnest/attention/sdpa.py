"""sdpa: one ``scaled_dot_product_attention`` per sequence (anywhere; the CPU default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q, k, v, info, scale, dropout) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]

    def run(q_, k_, v_):
        return F.scaled_dot_product_attention(
            q_, k_, v_, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
        )

    # [T, H, d] -> [1, H, T, d] views; split (not slicing): its backward is one concatenation instead of a
    # zero-filled full-size gradient per piece
    qs, ks, vs = (t.transpose(0, 1)[None].split(info.seqlens_q, dim=2) for t in (q, k, v))
    parts = []
    for i, n in enumerate(info.seqlens_q):
        c = info.context[i]
        if n == 0 or c < 0 or info.seqlens_q[c] == 0:
            parts.append(run(qs[i], ks[i], vs[i]) if n else qs[i])
            continue
        # Bottom-right causal over [context; own]. SDPA's is_causal is top-left aligned, and its CPU kernels
        # skip masked blocks only under is_causal: attend over the square [context; own] block and keep the
        # own rows, which measured faster than an offset mask (the context's rows are a small extra).
        out = run(*(torch.cat([t[c], t[i]], dim=2) for t in (qs, ks, vs)))
        parts.append(out[:, :, info.seqlens_q[c] :])
    return torch.cat(parts, dim=2)[0].transpose(0, 1)
