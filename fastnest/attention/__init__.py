"""Variable-length causal attention over packed sequences: the single place attention backends plug into.

Sequence ``i``'s queries are its own packed positions; its keys are those positions preceded by every token
of its context (a shared prefix packed once, see :class:`fastnest.packing.PackedSequences`). The causal mask
is aligned bottom-right: of a sequence with ``n`` queries and ``m`` keys, query ``j`` sees keys ``0 .. j+m-n``
(all of the context, and its own tokens up to itself). Tensors are tokens-major, ``[T, heads, dim]``. A last
layer that reads a few rows runs its queries at each sequence's tail only (``VarlenInfo.tail_queries``: the same
alignment, n tail queries of m keys; flash, xformers, native and sdpa). Every backend computes this same function
(``naive.py`` states it in plain loops):

- ``"flash"``: FlashAttention's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, compute capability >= 8.0);
  sliding window, softcap;
- ``"xformers"``: xformers' memory-efficient attention with a block-diagonal causal bias (CUDA);
- ``"flex"``: PyTorch FlexAttention with a document mask over the packed stream, its block mask built from
  the sequence lengths (``flex_mask``, no [T, T] tensor; forward anywhere, backward on CUDA only); sliding
  window, softcap, sinks (``s_aux``);
- ``"native"``: fastnest._C's kernel over every sequence at once (CPU, float32: the CPU default when built);
  sliding window; no dropout;
- ``"sdpa"``: one ``scaled_dot_product_attention`` per sequence (anywhere); sliding window.

q, k and v reach the backend in one dtype (the autocast dtype under autocast, see
``varlen.compute_dtype``); an option a backend lacks is a ValueError naming the backends that have it.

Which backend runs is decided by ``fastnest.dispatch`` (op ``"attention"``).
"""

from ..dispatch import OPS
from .varlen import VarlenInfo, varlen_attention

BACKENDS = OPS["attention"]

__all__ = ["BACKENDS", "VarlenInfo", "varlen_attention"]
