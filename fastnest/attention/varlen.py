"""``VarlenInfo`` (the packing, built once per step) and ``varlen_attention`` (the one entry point)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..dispatch import OPS
from ..packing import PackedSequences, check_context, cumulative_lengths, key_layout, ranges
from . import flash, flex, native, sdpa, xformers

# backend -> module with ``attend(q, k, v, info, scale, dropout, **options)``, the ``OPTIONS`` it takes
# (sliding_window, softcap, s_aux) and, where it needs one, ``prepare(info, device)``
_BACKENDS = {"flash": flash, "xformers": xformers, "flex": flex, "native": native, "sdpa": sdpa}
assert tuple(_BACKENDS) == OPS["attention"]


@dataclass(frozen=True, eq=False)
class VarlenInfo:
    """The packing, on the model's device, computed once per step and handed to every layer.

    ``seqlens_q``/``seqlens_k`` and ``max_seqlen_*`` are host values (no per-layer synchronisation);
    ``key_index`` (packed position of every key, None when the keys are the queries) gathers the keys of
    sequences with a context; ``prepared`` is the backend's own per-step structure. An info from
    :meth:`tail_queries` has ``query_index`` (the packed position of each of its queries: each sequence's tail)
    and ``key_rows`` (the packing's tokens, which the key and value tensors still hold).
    """

    backend: str
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    context: tuple[int, ...]
    context_lens: tuple[int, ...]  # leading tokens of its context each sequence continues (0: none)
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1]
    key_index: torch.Tensor | None  # int64 [sum(seqlens_k)]
    max_seqlen_q: int
    max_seqlen_k: int
    prepared: Any = None
    query_index: torch.Tensor | None = None  # int64 [total]; None: the queries are the packed positions
    key_rows: int | None = None  # rows of key/value when the queries are tails; None: ``total``

    @property
    def total(self) -> int:
        return sum(self.seqlens_q)

    @property
    def supports_tail_queries(self) -> bool:
        return _BACKENDS[self.backend].TAIL_QUERIES

    def tail_queries(self, rows: torch.Tensor) -> tuple[VarlenInfo, torch.Tensor]:
        """The same keys, each sequence's queries cut to its tail from its first position among ``rows`` (host
        packed positions, any order): a last layer that reads only ``rows`` needs attention at those queries
        alone (a tail of ``n`` of the sequence's ``m`` keys sees them bottom-right aligned, as a continuation
        does). A sequence with no read row keeps no query and no key. Computed from host values only.

        Returns ``(tail, picks)``: ``tail.query_index`` (on this info's device) lists the tail queries' packed
        positions, in the order its attention returns them; ``picks`` where each of ``rows`` lies among them.
        """
        if not self.supports_tail_queries:
            raise ValueError(
                f"attention backend {self.backend!r} has no tail queries; backends that do: "
                f"{tuple(b for b, m in _BACKENDS.items() if m.TAIL_QUERIES)}"
            )
        if self.query_index is not None:
            raise ValueError("these queries are tails already")
        rows = rows.long()
        ends = cumulative_lengths(self.seqlens_q).long()
        bad = rows[(rows < 0) | (rows >= self.total)]
        if bad.numel():
            raise ValueError(f"rows must be packed positions in [0, {self.total}), got {bad[:8].tolist()}")
        sequence = torch.searchsorted(ends, rows, right=True) - 1
        first = ends[1:].clone().scatter_reduce_(0, sequence, rows, "amin")  # a sequence with no row: its end
        lengths = ends[1:] - first
        cu_q = cumulative_lengths(lengths.tolist())
        query_index = ranges(first, lengths)
        picks = rows - first[sequence] + cu_q[:-1].long()[sequence]
        # the keys' packed positions recomputed on the host (reading key_index back would wait for the device)
        keys = key_layout(self.seqlens_q, self.context, self.context_lens)[2]
        keys = torch.arange(self.total) if keys is None else keys
        read = lengths > 0
        key_counts = torch.tensor(self.seqlens_k, dtype=torch.long)
        seqlens_k = key_counts * read
        key_index = keys[read.repeat_interleave(key_counts)]
        device = self.cu_seqlens_q.device
        tail = self._build(
            self.backend,
            device,
            tuple(lengths.tolist()),
            tuple(seqlens_k.tolist()),
            self.context,
            self.context_lens,
            cu_q,
            cumulative_lengths(seqlens_k.tolist()),
            key_index,
            query_index=query_index,
            key_rows=self.total,
        )
        return tail, picks.to(device, non_blocking=True)

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
            packed.context_lens,
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
        context_lens: Sequence[int] | None = None,
    ) -> VarlenInfo:
        """Sequences laid end to end (``context[i]``: index of an earlier sequence it continues, or -1;
        ``context_lens[i]``: how many of that sequence's first tokens, default all)."""
        seqlens = tuple(int(n) for n in seqlens)
        ctx, lens = check_context(context if context is not None else (-1,) * len(seqlens), seqlens, context_lens)
        seqlens_k, cu_k, key_index = key_layout(seqlens, ctx, lens)
        cu_q = cumulative_lengths(seqlens)
        return cls._build(backend, torch.device(device), seqlens, seqlens_k, ctx, lens, cu_q, cu_k, key_index)

    @classmethod
    def _build(
        cls, backend, device, seqlens_q, seqlens_k, context, context_lens, cu_q, cu_k, key_index, **tail_fields
    ) -> VarlenInfo:
        if backend not in _BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {OPS['attention']}")

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        cu_q = move(cu_q)
        info = cls(
            backend=backend,
            seqlens_q=tuple(seqlens_q),
            seqlens_k=tuple(seqlens_k),
            context=tuple(context),
            context_lens=tuple(context_lens),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_q if key_index is None else move(cu_k),
            key_index=None if key_index is None else move(key_index),
            max_seqlen_q=max(seqlens_q, default=0),
            max_seqlen_k=max(seqlens_k, default=0),
            **{k: move(v) if isinstance(v, torch.Tensor) else v for k, v in tail_fields.items()},
        )
        prepare = getattr(_BACKENDS[backend], "prepare", None)
        return replace(info, prepared=prepare(info, device)) if prepare is not None and info.total else info


def compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one dtype the backend receives query, key and value in.

    Under autocast on their device: the autocast dtype. Inside Hugging Face's Llama under bf16 autocast the
    projections come out in bf16, but RoPE multiplies q and k by the fp32 cos/sin of the fp32 hidden states,
    so q and k arrive in fp32 and v in bf16: HF's own flash integration casts fp32 inputs to the autocast dtype
    for this case, and its sdpa/eager paths compute (and return) the autocast dtype. Without autocast, equal
    dtypes are kept; mixed ones are cast to the one half dtype among them (HF casts to the layer's weight
    dtype, which is that one); a mix with no or with two half dtypes is a ValueError.
    """
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) == 1:
        return query.dtype
    halves = dtypes & {torch.float16, torch.bfloat16}
    if len(halves) != 1:
        raise ValueError(
            f"query/key/value dtypes {query.dtype}/{key.dtype}/{value.dtype} differ outside autocast and do not "
            "contain exactly one of float16/bfloat16 to cast to; pass one dtype or run under torch.autocast"
        )
    return halves.pop()


def _check_options(backend: str, options: dict[str, Any]) -> None:
    for name, value in options.items():
        if value is None:
            continue
        if name not in _BACKENDS[backend].OPTIONS:
            supported = tuple(b for b, m in _BACKENDS.items() if name in m.OPTIONS)
            raise ValueError(
                f"attention backend {backend!r} does not support {name}={_show(value)}; backends that do: {supported}"
            )
    window, softcap = options.get("sliding_window"), options.get("softcap")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive int (keys per query, itself included), got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap!r}")


def _show(value: Any) -> str:
    return f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    info: VarlenInfo,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention inside each packed sequence (and its context), never across; ``info.backend`` runs it.

    ``query [T, H, d]``, ``key``/``value [T, Hkv, d]`` (tokens-major; grouped-query when ``Hkv < H``; any
    strides); returns ``[T, H, d]`` in :func:`compute_dtype` (q, k and v are cast to it first). With an info
    from :meth:`VarlenInfo.tail_queries`, ``query`` holds the tail queries only (``info.query_index``) and
    key/value every packed position.
    Options (Hugging Face's attention kwargs; a backend without one raises a ValueError naming those with it):
    ``sliding_window`` W: a query sees its last W keys (itself included; HF's ``kv_idx > q_idx - W``; a W of
    at least every sequence's key count is no window, e.g. Mistral's 4096 over shorter sequences);
    ``softcap`` c: scores (after ``scale``) become ``c * tanh(score / c)``; ``s_aux [H]``: a per-head sink
    logit joining each softmax's denominator with no value (GPT-OSS's sinks).
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [tokens, heads, dim], got shape {tuple(query.shape)}")
    total, heads, kv_heads = query.shape[0], query.shape[1], key.shape[1]
    keys = info.total if info.key_rows is None else info.key_rows
    if info.total != total or key.shape[0] != keys or value.shape[0] != keys:
        expected = f"{info.total}" if info.key_rows is None else f"{info.total} queries of {keys} keys"
        raise ValueError(
            f"sequence lengths sum to {expected} but query/key/value hold {total}/{key.shape[0]}/"
            f"{value.shape[0]} tokens"
        )
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} key/value heads")
    if sliding_window is not None and isinstance(sliding_window, int) and sliding_window >= info.max_seqlen_k:
        sliding_window = None  # it covers every sequence's keys: the same function on any backend
    options = {"sliding_window": sliding_window, "softcap": softcap, "s_aux": s_aux}
    _check_options(info.backend, options)
    if s_aux is not None and tuple(s_aux.shape) != (heads,):
        raise ValueError(f"s_aux must hold one logit per query head ({heads},), got shape {tuple(s_aux.shape)}")
    dtype = compute_dtype(query, key, value)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    if total == 0:
        return query
    given = {k: v for k, v in options.items() if v is not None}
    return _BACKENDS[info.backend].attend(query, key, value, info, scale, dropout, **given)
