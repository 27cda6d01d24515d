"""sdpa: one ``scaled_dot_product_attention`` per sequence (anywhere; the CPU default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPTIONS = frozenset({"sliding_window"})  # a window is an explicit mask; softcap and sinks are not SDPA's function


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` boolean: query j sees key m iff ``j - window < m <= j``."""
    j = torch.arange(n, device=device)
    diff = j[:, None] - j[None, :]
    return (diff >= 0) & (diff < window)


def attend(q, k, v, info, scale, dropout, sliding_window: int | None = None) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]

    def run(q_, k_, v_):
        n = q_.shape[2]
        if sliding_window is None or sliding_window >= n:  # a window at least the block's size changes nothing
            return F.scaled_dot_product_attention(
                q_, k_, v_, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
            )
        mask = _window_mask(n, sliding_window, q_.device)
        return F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )

    # [T, H, d] -> [1, H, T, d] views; split (not slicing): its backward is one concatenation instead of a
    # zero-filled full-size gradient per piece
    qs, ks, vs = (t.transpose(0, 1)[None].split(info.seqlens_q, dim=2) for t in (q, k, v))
    parts = []
    for i, n in enumerate(info.seqlens_q):
        c, before = info.context[i], info.context_lens[i]
        if n == 0 or before == 0:
            parts.append(run(qs[i], ks[i], vs[i]) if n else qs[i])
            continue
        # Bottom-right causal over [context; own]. SDPA's is_causal is top-left aligned, and its CPU kernels
        # skip masked blocks only under is_causal: attend over the square [context; own] block and keep the
        # own rows, which measured faster than an offset mask (the context's rows are a small extra).
        out = run(*(torch.cat([t[c][:, :, :before], t[i]], dim=2) for t in (qs, ks, vs)))
        parts.append(out[:, :, before:])
    return torch.cat(parts, dim=2)[0].transpose(0, 1)
