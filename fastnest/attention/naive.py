"""The plain reference of varlen attention: explicit per-sequence causal softmax attention in float64."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: Sequence[int],
    context: Sequence[int] | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    context_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Plain loops in float64: for each sequence and head, softmax(Q K^T * scale + mask) V.

    Sequence i's queries are its own tokens; its keys are its context's tokens (its first ``context_lens[i]``,
    default all) then its own; query j of n sees key m of M iff m <= j + M - n (and, with a ``sliding_window`` W, also
    m > j + M - n - W). ``softcap`` c maps each scaled score s to c * tanh(s / c); ``s_aux [H]`` adds
    exp(s_aux[h]) to head h's softmax denominator (a sink with no value). ``q [T, H, d]``, ``k``/``v [T, Hkv,
    d]``; query head h reads kv head h // (H // Hkv). Returns ``[T, H, d]`` (float64).
    """
    t, h, d = q.shape
    hkv = k.shape[1]
    assert h % hkv == 0
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    context = list(context) if context is not None else [-1] * len(seqlens)
    q, k, v = q.double(), k.double(), v.double()
    starts = [sum(seqlens[:i]) for i in range(len(seqlens))]
    out = q.new_zeros(t, h, d)
    for i, n in enumerate(seqlens):
        own = list(range(starts[i], starts[i] + n))
        c = context[i]
        before = (seqlens[c] if context_lens is None else context_lens[i]) if c >= 0 else 0
        keys = list(range(starts[c], starts[c] + before)) + own
        m = len(keys)
        for head in range(h if n else 0):
            kv = head // (h // hkv)
            scores = q[own, head] @ k[keys, kv].T * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            back = torch.arange(n)[:, None] + (m - n) - torch.arange(m)[None, :]  # how far back each key lies
            visible = (back >= 0) & (back < (sliding_window or m + 1))
            scores = torch.where(visible, scores, float("-inf"))
            top = scores.amax(dim=-1, keepdim=True)
            sink = 0.0 if s_aux is None else torch.exp(s_aux[head].double() - top)
            p = torch.exp(scores - top)
            out[own, head] = (p / (p.sum(dim=-1, keepdim=True) + sink)) @ v[keys, kv]
    return out
