"""Hugging Face attention hook: the packed language-model forward routes through fastnest.attention.

Patching sets the text config's attention implementation to ``fastnest:<inner>``. Calls that carry a
``fastnest_varlen`` kwarg (the packed training step) run fastnest's varlen attention with the backend that
kwarg's VarlenInfo names; every other call (inference, generation) goes to the model's own ``<inner>``
implementation unchanged. Keeping the choice in the layer's kwargs, not in global state, keeps
gradient-checkpointing recomputation correct.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import varlen_attention

PREFIX = "fastnest:"
VARLEN_KWARG = "fastnest_varlen"
_PACKED = contextvars.ContextVar("fastnest_packed", default=False)


@contextlib.contextmanager
def packed_forward() -> Iterator[None]:
    """While active, mask creation returns None: packed sequences are kept apart by varlen attention."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def _inner_attention(inner: str, module: torch.nn.Module) -> Callable:
    try:
        return ALL_ATTENTION_FUNCTIONS[inner]
    except KeyError:
        pass
    # "eager" lives in each model's own module, not in the global registry.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if inner != "eager" or fn is None:
        raise ValueError(f"attention implementation {inner!r} is not registered with transformers")
    return fn


def register(inner: str) -> str:
    """Register (once) and return the ``fastnest:<inner>`` implementation name."""
    if inner.startswith(PREFIX):
        return inner
    name = PREFIX + inner

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        info = kwargs.pop(VARLEN_KWARG, None)
        if info is not None:  # HF's [1, heads, T, d] in, [1, T, heads, d] out; fastnest's is tokens-major
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
            # the layer's sliding window, logit softcap and sinks reach the backend (or fail there, named)
            options = {name: kwargs.get(name) for name in ("sliding_window", "softcap", "s_aux")}
            return varlen_attention(q, k, v, info, scale=scaling, dropout=dropout, **options)[None], None
        fn = _inner_attention(inner, module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def mask(**kwargs):
        if _PACKED.get() or inner not in ALL_MASK_ATTENTION_FUNCTIONS:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[inner](**kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name
