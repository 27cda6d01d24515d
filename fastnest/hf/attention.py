"""Hugging Face attention hook: the packed language-model forward routes through fastnest.attention.

Patching gives the language model's attention modules (not its configs) a view of the text config whose
attention implementation is ``fastnest``: a registered function that runs fastnest's varlen attention when
the call carries a ``fastnest_varlen`` kwarg (the packed training step) and otherwise calls the model's own
implementation, read from the real config at call time. So ``config.text_config._attn_implementation`` stays
what the user set, ``set_attn_implementation`` before or after patching is followed, and since the choice
travels in the layer's kwargs (not in global state or a temporarily switched config),
gradient-checkpointing recomputation in the backward pass routes the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import varlen_attention

ROUTED = "fastnest"
VARLEN_KWARG = "fastnest_varlen"


class RoutedConfig:
    """The text config as the attention modules read it: every attribute is the real config's, except the
    attention implementation, which is fastnest's router."""

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

    def __reduce__(self):  # copy / deepcopy / pickle rebuild the view over the (copied) real config
        return RoutedConfig, (self.config,)


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
    if info is not None:  # HF's [1, heads, T, d] in, [1, T, heads, d] out; fastnest's is tokens-major
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return varlen_attention(q, k, v, info, scale=scaling, dropout=dropout)[None], None
    fn = _inner_attention(module.config.config._attn_implementation, module)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ROUTED, _route)


def route(language_model: torch.nn.Module) -> None:
    """Give every submodule of ``language_model`` that reads its config (attention, MLP, ...) the routed view;
    the decoder itself (a PreTrainedModel: mask creation, ``set_attn_implementation``) keeps the real one."""
    config = language_model.config
    for module in language_model.modules():
        if not isinstance(module, PreTrainedModel) and getattr(module, "config", None) is config:
            module.config = RoutedConfig(config)


def unroute(language_model: torch.nn.Module) -> None:
    for module in language_model.modules():
        if isinstance(getattr(module, "config", None), RoutedConfig):
            module.config = module.config.config


def packed_call(
    language_model: torch.nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, info
) -> torch.Tensor:
    """``[T, D] -> [T, D]``: the decoder over a packed sequence, attention by ``info``.

    HF returns a 4-D attention mask as given, so a [1, 1, 1, 1] stand-in keeps it from building a dense
    [T, T] mask for the packed positions; the routed attention ignores it when the varlen info is there.
    """
    out = language_model(
        inputs_embeds=embeds[None],
        position_ids=position_ids[None],
        attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device),
        use_cache=False,
        **{VARLEN_KWARG: info},
    )
    return out.last_hidden_state[0]
