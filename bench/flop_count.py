"""The FLOPs of one training step, counted by a dispatch hook, and the GEMM sequence it ran (for the GEMM rate).

Counted (forward and backward, every aten call under the mode): matrix products ``mm``/``addmm`` as ``2·M·K·N`` and
``bmm``/``baddbmm`` as ``2·B·M·K·N``; fused attention (``_scaled_dot_product_flash_attention_for_cpu``, fastnest's
native ``fastnest::attention_forward``, and their backwards) as the useful work: forward ``4·H·d`` per visible
(query, key) pair (QKᵀ and PV), the pairs being the causal half of the ``Lq × Lk`` scores under SDPA's
``is_causal`` (``2·H·d·Lq·Lk``), those an explicit mask leaves (the last layer's tail queries), the native op's
bottom-right causal (and windowed) ones, else all; backward twice that (dV, dP, dQ, dK; the recomputed scores not
counted). Elementwise work is not counted.
"""

from __future__ import annotations

import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MM = {aten.mm, aten.addmm}
_BMM = {aten.bmm, aten.baddbmm}
_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward
_NATIVE = "fastnest::attention_forward"
_NATIVE_BACKWARD = "fastnest::attention_backward"


def native_pairs(cu_q: torch.Tensor, cu_k: torch.Tensor, window: int) -> int:
    """Visible (query, key) pairs of the native op: query i of n sees key p of m iff p <= i + m - n (and, with a
    window W, p > i + m - n - W)."""
    pairs = 0
    for n, m in zip(cu_q.diff().tolist(), cu_k.diff().tolist()):
        seen = torch.arange(m - n, m) + 1  # keys up to and including the query's own position
        pairs += int((seen.clamp(max=window) if window else seen).sum())
    return pairs


def _transposed(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.shape[0] > 1


class FlopCount(TorchDispatchMode):
    """``gemm_flops``, ``attention_flops`` and ``gemms``: ``(M, K, N, a transposed, b transposed) -> calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.gemm_flops = 0
        self.attention_flops = 0
        self.gemms: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _MM:
            a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
            (m, k), n = a.shape, b.shape[1]
            self.gemm_flops += 2 * m * k * n
            self.gemms[(m, k, n, _transposed(a), _transposed(b))] += 1
        elif packet in _BMM:
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            batch, m, k = a.shape
            self.gemm_flops += 2 * batch * m * k * b.shape[2]
        elif packet in (_SDPA, _SDPA_BACKWARD):
            bound = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
            q, k, mask = bound["query"], bound["key"], bound.get("attn_mask")
            (batch, heads, lq, d), lk = q.shape, k.shape[2]
            if mask is not None:  # additive (-inf: hidden) or boolean (False: hidden)
                visible = mask if mask.dtype == torch.bool else mask != float("-inf")
                pairs = int(visible.expand(batch, heads, lq, lk).sum())
            else:
                pairs = batch * heads * lq * lk // (2 if bound.get("is_causal") else 1)
            work = 4 * d * pairs
            self.attention_flops += work if packet is _SDPA else 2 * work
        elif func.name() in (_NATIVE, _NATIVE_BACKWARD):
            forward = func.name() == _NATIVE
            q, cu_q, cu_k, window = (args[0], args[4], args[5], args[7]) if forward else (args[1], *args[7:9], args[10])
            work = 4 * q.shape[1] * q.shape[2] * native_pairs(cu_q, cu_k, window)
            self.attention_flops += work if forward else 2 * work
        return func(*args, **(kwargs or {}))

    @property
    def flops(self) -> int:
        return self.gemm_flops + self.attention_flops


def gemm_operands(gemms: collections.Counter) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Random fp32 operands in each recorded shape and layout, with its call count."""
    out = []
    for (m, k, n, a_t, b_t), calls in gemms.items():
        a = torch.randn(k, m).t() if a_t else torch.randn(m, k)
        b = torch.randn(n, k).t() if b_t else torch.randn(k, n)
        out.append((a, b, calls))
    return out


def time_gemms(operands: list[tuple[torch.Tensor, torch.Tensor, int]]) -> float:
    """Seconds to run the step's matrix products (``torch.mm``, each shape as often as the step did)."""
    start = time.perf_counter()
    for a, b, calls in operands:
        for _ in range(calls):
            torch.mm(a, b)
    return time.perf_counter() - start
