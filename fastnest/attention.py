"""Variable-length causal attention over packed sequences: the single place attention backends plug into.

Sequence ``i``'s queries are its own packed positions; its keys are those positions preceded by every token
of its context (a shared prefix packed once, see :class:`fastnest.packing.PackedSequences`). The causal mask
is aligned bottom-right: of a sequence with ``n`` queries and ``m`` keys, query ``j`` sees keys ``0 .. j+m-n``
(all of the context, and its own tokens up to itself). Every backend computes this same function:

- ``"flash"``: FlashAttention's ``flash_attn_varlen_func`` (CUDA, fp16/bf16);
- ``"xformers"``: xformers' memory-efficient attention with a block-diagonal causal bias (CUDA);
- ``"flex"``: PyTorch FlexAttention with a document mask over the packed stream (forward anywhere,
  backward on CUDA only);
- ``"sdpa"``: one ``scaled_dot_product_attention`` per sequence (anywhere; the CPU default).

What a backend needs beyond the tensors (device copies of the offsets, the xformers bias, the flex block
mask) is built once per step in :class:`VarlenInfo` and reused by every layer, without host synchronisation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from .dispatch import OPS
from .packing import PackedSequences, cumulative_lengths, key_layout

BACKENDS = OPS["attention"]


@dataclass(frozen=True, eq=False)
class VarlenInfo:
    """The packing, on the model's device, computed once per step and handed to every layer.

    ``seqlens_q``/``seqlens_k`` and ``max_seqlen_*`` are host values (no per-layer synchronisation);
    ``key_index`` (packed position of every key, None when the keys are the queries) gathers the keys of
    sequences with a context; ``prepared`` is the backend's own per-step structure.
    """

    backend: str
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    context: tuple[int, ...]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1]
    key_index: torch.Tensor | None  # int64 [sum(seqlens_k)]
    max_seqlen_q: int
    max_seqlen_k: int
    prepared: Any = None

    @property
    def total(self) -> int:
        return sum(self.seqlens_q)

    @classmethod
    def from_packed(
        cls, packed: PackedSequences, device: torch.device | str | None = None, backend: str = "sdpa"
    ) -> VarlenInfo:
        return cls._build(
            backend,
            torch.device(device) if device is not None else packed.cu_seqlens.device,
            packed.seqlens,
            packed.seqlens_k,
            packed.context,
            packed.cu_seqlens,
            packed.cu_seqlens_k,
            packed.key_index,
        )

    @classmethod
    def from_seqlens(
        cls,
        seqlens: Sequence[int],
        context: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        backend: str = "sdpa",
    ) -> VarlenInfo:
        """Sequences laid end to end (``context[i]``: index of an earlier sequence it continues, or -1)."""
        seqlens = tuple(int(n) for n in seqlens)
        seqlens_k, cu_k, key_index = key_layout(seqlens, context)
        ctx = tuple(context) if context is not None else (-1,) * len(seqlens)
        cu_q = cumulative_lengths(seqlens)
        return cls._build(backend, torch.device(device), seqlens, seqlens_k, ctx, cu_q, cu_k, key_index)

    @classmethod
    def _build(cls, backend, device, seqlens_q, seqlens_k, context, cu_q, cu_k, key_index) -> VarlenInfo:
        if backend not in _BACKEND_FNS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        cu_q = move(cu_q)
        info = cls(
            backend=backend,
            seqlens_q=tuple(seqlens_q),
            seqlens_k=tuple(seqlens_k),
            context=tuple(context),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_q if key_index is None else move(cu_k),
            key_index=None if key_index is None else move(key_index),
            max_seqlen_q=max(seqlens_q, default=0),
            max_seqlen_k=max(seqlens_k, default=0),
        )
        prepare = _PREPARE.get(backend)
        return replace(info, prepared=prepare(info, device)) if prepare is not None and info.total else info


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    info: VarlenInfo,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention inside each packed sequence (and its context), never across; ``info.backend`` runs it.

    ``query [1, H, T, d]``, ``key``/``value [1, Hkv, T, d]`` (Hugging Face's layout; grouped-query when
    ``Hkv < H``); returns ``[1, T, H, d]``.
    """
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"query must be [1, heads, tokens, dim], got shape {tuple(query.shape)}")
    heads, total, kv_heads = query.shape[1], query.shape[2], key.shape[1]
    if info.total != total or key.shape[2] != total or value.shape[2] != total:
        raise ValueError(
            f"sequence lengths sum to {info.total} but query/key/value hold {total}/{key.shape[2]}/"
            f"{value.shape[2]} tokens"
        )
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} key/value heads")
    if total == 0:
        return query.transpose(1, 2)
    return _BACKEND_FNS[info.backend](query, key, value, info, scale, dropout)


# --- sdpa: one SDPA per sequence ---------------------------------------------------------------------------


def _sdpa(q, k, v, info: VarlenInfo, scale, dropout) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]

    def attend(q_, k_, v_):
        return F.scaled_dot_product_attention(
            q_, k_, v_, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
        )

    # split (not slicing): its backward is one concatenation instead of a zero-filled full-size gradient per piece
    qs, ks, vs = (t.split(info.seqlens_q, dim=2) for t in (q, k, v))
    parts = []
    for i, n in enumerate(info.seqlens_q):
        c = info.context[i]
        if n == 0 or c < 0 or info.seqlens_q[c] == 0:
            parts.append(attend(qs[i], ks[i], vs[i]) if n else qs[i])
            continue
        # Bottom-right causal over [context; own]. SDPA's is_causal is top-left aligned, and its CPU kernels
        # skip masked blocks only under is_causal: attend over the square [context; own] block and keep the
        # own rows, which measured faster than an offset mask (the context's rows are a small extra).
        out = attend(*(torch.cat([t[c], t[i]], dim=2) for t in (qs, ks, vs)))
        parts.append(out[:, :, info.seqlens_q[c] :])
    return torch.cat(parts, dim=2).transpose(1, 2)


# --- flash / xformers: one kernel over [tokens, heads, dim] views ---------------------------------------------


def _nonempty_offsets(info: VarlenInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Offsets over the sequences that have tokens (empty ones take no positions, so dropping them is free)."""
    q_lens = [n for n in info.seqlens_q if n]
    k_lens = [m for n, m in zip(info.seqlens_q, info.seqlens_k) if n]
    cu_q, cu_k = (cumulative_lengths(lens).to(device, non_blocking=True) for lens in (q_lens, k_lens))
    return cu_q, cu_k, q_lens, k_lens


def _tokens_major(q, k, v, info: VarlenInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[1, H, T, d]`` -> ``[T, H, d]`` views (no copy: the kernels take any token/head strides), keys
    gathered per sequence when some sequence has a context (the gather's backward sums the context's
    gradients over every sequence that read it)."""
    q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))
    if info.key_index is not None:
        k3, v3 = k3.index_select(0, info.key_index), v3.index_select(0, info.key_index)
    return q3, k3, v3


def _prepare_flash(info: VarlenInfo, device: torch.device):
    cu_q, cu_k, _, _ = _nonempty_offsets(info, device)
    return cu_q, cu_k


def _flash(q, k, v, info: VarlenInfo, scale, dropout) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_k = info.prepared
    q3, k3, v3 = _tokens_major(q, k, v, info)
    # flash's causal mask is bottom-right aligned when query and key lengths differ (flash-attn >= 2.1)
    out = flash_attn_varlen_func(
        q3,
        k3,
        v3,
        cu_q,
        cu_k,
        info.max_seqlen_q,
        info.max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
    )
    return out.unsqueeze(0)


def _prepare_xformers(info: VarlenInfo, device: torch.device):
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask, BlockDiagonalCausalMask

    _, _, q_lens, k_lens = _nonempty_offsets(info, device)
    if info.key_index is None:
        return BlockDiagonalCausalMask.from_seqlens(q_lens, device=device)
    return BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_lens, k_lens, device=device)


def _xformers(q, k, v, info: VarlenInfo, scale, dropout) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[3]
    q3, k3, v3 = _tokens_major(q, k, v, info)
    if kv_heads == heads:
        q_, k_, v_ = q3[None], k3[None], v3[None]  # [1, T, H, d]
    else:  # grouped-query: xformers' [B, T, groups, heads per group, d] layout, K/V broadcast over a group
        group = heads // kv_heads
        q_ = q3.unflatten(1, (kv_heads, group))[None]
        k_, v_ = (t[:, :, None].expand(-1, -1, group, -1)[None] for t in (k3, v3))
    out = memory_efficient_attention(q_, k_, v_, attn_bias=info.prepared, p=dropout, scale=scale)
    return out.reshape(1, q3.shape[0], heads, d)


# --- flex: a document mask over the packed stream (no gather: contexts are found where they lie) ------------


def _prepare_flex(info: VarlenInfo, device: torch.device):
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


def _flex(q, k, v, info: VarlenInfo, scale, dropout) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError(f"FlexAttention has no attention dropout (got dropout={dropout}); use another backend")
    # compiled on CUDA (eager flex materialises every score); eager on CPU, where only the forward runs
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(q, k, v, block_mask=info.prepared, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


_BACKEND_FNS = {"flash": _flash, "xformers": _xformers, "flex": _flex, "sdpa": _sdpa}
_PREPARE = {"flash": _prepare_flash, "xformers": _prepare_xformers, "flex": _prepare_flex}
