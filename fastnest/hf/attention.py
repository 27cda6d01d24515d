"""Hugging Face attention hook: the packed language-model forward routes through fastnest.attention.

Patching wraps the ``forward`` of the language model's attention modules (on the instance): a call that
carries a ``fastnest_varlen`` kwarg (the packed training step) runs with the module's config seen through a
view whose attention implementation is ``fastnest``, a registered function that runs fastnest's varlen
attention; every other call runs untouched. The configs themselves never change, so
``config.text_config._attn_implementation`` and every module's config read what the user set, and
``set_attn_implementation`` before or after patching is followed. Since the choice travels with the call's
kwargs, gradient-checkpointing recomputation in the backward pass routes the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import varlen_attention
from ..instance_method import InstanceMethod
from .lm_kernels import KERNELS_KWARG, ROWS_KWARG, TAIL_KWARG, VARLEN_KWARG

ROUTED = "fastnest"


class RoutedConfig:
    """A config as an attention module reads it during a packed call: every attribute is the real config's,
    except the attention implementation, which is fastnest's router."""

    __slots__ = ("config",)

    def __init__(self, config) -> None:
        object.__setattr__(self, "config", config)

    @property
    def _attn_implementation(self) -> str:
        return ROUTED

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "config":  # copy/pickle protocol: this object's own
            raise AttributeError(name)
        return getattr(self.config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.config, name, value)


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


def _route(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    info = kwargs.pop(VARLEN_KWARG, None)
    if info is None:  # only packed calls see the router; any other reaches the real implementation
        fn = _inner_attention(module.config.config._attn_implementation, module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    # HF's [1, heads, T, d] in, [1, T, heads, d] out; fastnest's is tokens-major
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    # the layer's sliding window, logit softcap and sinks reach the backend (or fail there, named)
    options = {name: kwargs.get(name) for name in ("sliding_window", "softcap", "s_aux")}
    return varlen_attention(q, k, v, info, scale=scaling, dropout=dropout, **options)[None], None


AttentionInterface.register(ROUTED, _route)


def _routed_forward(self, *args, **kwargs):
    """An attention module's forward: a packed call runs with the routed view of its config."""
    own = type(self).forward
    if kwargs.get(VARLEN_KWARG) is None:
        return own(self, *args, **kwargs)
    config = self.config
    self.config = RoutedConfig(config)
    try:
        return own(self, *args, **kwargs)
    finally:
        self.config = config


def _attention_modules(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention interface: ``*Attention`` classes reading the decoder's config (the
    naming Hugging Face's own tests rely on)."""
    config = language_model.config
    return [
        m
        for m in language_model.modules()
        if type(m).__name__.endswith("Attention") and getattr(m, "config", None) is config
    ]


def route(language_model: torch.nn.Module) -> None:
    for module in _attention_modules(language_model):
        module.forward = InstanceMethod(_routed_forward, module)


def unroute(language_model: torch.nn.Module) -> None:
    for module in _attention_modules(language_model):
        module.__dict__.pop("forward", None)


def packed_call(
    language_model: torch.nn.Module,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    info,
    rows: torch.Tensor,
    kernels: str = "torch",
    tail=None,
) -> torch.Tensor:
    """``[T, D] -> [R, D]``: the decoder over a packed sequence, attention by ``info``, the decoder layers'
    elementwise ops by ``kernels`` (``fastnest.hf.lm_kernels``: "native", "liger" or the model's own, "torch");
    the final hidden states at the packed positions ``rows``. With fused kernels the last layer computes only
    those rows past its attention, and its attention at ``tail``'s queries (``info.tail_queries(rows)``, None:
    every query; ``lm_kernels``); the model's own layers compute every row, then ``rows`` is taken.

    HF returns a 4-D attention mask as given, so a [1, 1, 1, 1] stand-in keeps it from building a dense
    [T, T] mask for the packed positions; the routed attention ignores it when the varlen info is there.
    """
    fused = {} if kernels == "torch" else {KERNELS_KWARG: kernels, ROWS_KWARG: rows, TAIL_KWARG: tail}
    out = language_model(
        inputs_embeds=embeds[None],
        position_ids=position_ids[None],
        attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device),
        use_cache=False,
        **{VARLEN_KWARG: info},
        **fused,
    )
    hidden = out.last_hidden_state[0]
    return hidden if fused else hidden[rows]
