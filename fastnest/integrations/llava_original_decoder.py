"""The packed decoder pass over a transformers-4.36 Llama or Mistral decoder (the original LLaVA's language model).

transformers 4.36 has no attention-function registry: each attention class (``LlamaAttention``,
``LlamaSdpaAttention``, ``LlamaFlashAttention2``, ``MistralAttention``, ...) computes attention inside its own
``forward``. So the packed call carries the :class:`fastnest.VarlenInfo` where the decoder layer passes the
attention mask through, and each attention module's ``forward``, wrapped on the instance, runs the packed
attention for such a call (its own projections and rotary embedding, then ``varlen_attention``) and its own
class's ``forward`` for every other call. Since the info is an argument of the layer, gradient-checkpointing
recomputation in the backward routes the same way.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..attention import VarlenInfo, varlen_attention
from ..instance_method import InstanceMethod

_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb")


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(decoder, n) for n in ("embed_tokens", "norm")):
        raise ValueError(
            f"{type(decoder).__name__} is not a Llama-style decoder (layers, embed_tokens, norm); fastnest's "
            "original-LLaVA integration supports LlavaLlamaForCausalLM and LlavaMistralForCausalLM"
        )
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    for i, module in enumerate(modules):
        missing = [n for n in _PARTS if not hasattr(module, n)]
        if missing or not hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb"):
            raise ValueError(
                f"layer {i}'s attention ({type(module).__name__}) lacks {missing or ['apply_rotary_pos_emb']}: "
                "fastnest runs the packed attention of transformers 4.36's Llama and Mistral attention classes"
            )
    return modules


def _packed_attention(module: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, info: VarlenInfo):
    """``[1, T, D] -> [1, T, D]``: the module's projections and rotary embedding (as its own forward computes
    them), attention inside each packed sequence by ``info``, then its output projection."""
    total = hidden.shape[1]
    heads, kv_heads, dim = module.num_heads, module.num_key_value_heads, module.head_dim
    q = module.q_proj(hidden).view(1, total, heads, dim).transpose(1, 2)
    k = module.k_proj(hidden).view(1, total, kv_heads, dim).transpose(1, 2)
    v = module.v_proj(hidden).view(1, total, kv_heads, dim).transpose(1, 2)
    # positions restart per sequence: the longest key span (context + own tokens) bounds them
    cos, sin = module.rotary_emb(v, seq_len=info.max_seqlen_k)
    q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    out = varlen_attention(
        *(t[0].transpose(0, 1) for t in (q, k, v)),
        info,
        dropout=module.attention_dropout if module.training else 0.0,
        sliding_window=getattr(module.config, "sliding_window", None),  # Mistral's; its masks keep the last W keys
    )
    return module.o_proj(out.reshape(1, total, heads * dim))


def _routed_forward(self, *args, **kwargs):
    """An attention module's forward: a packed call (the decoder layer passes ``attention_mask`` by keyword)
    runs the packed attention; any other runs the module's own class's forward."""
    info = kwargs.get("attention_mask")
    if not isinstance(info, VarlenInfo):
        return type(self).forward(self, *args, **kwargs)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return _packed_attention(self, hidden, kwargs["position_ids"], info), None, None


def route(decoder: nn.Module) -> None:
    """Wrap the ``forward`` of the decoder's attention modules (on the instances)."""
    for module in _attention_modules(decoder):
        module.forward = InstanceMethod(_routed_forward, module)


def unroute(decoder: nn.Module) -> None:
    for module in _attention_modules(decoder):
        module.__dict__.pop("forward", None)


def packed_decoder(decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, info: VarlenInfo):
    """``[T, D] -> [T, D]``: the decoder's layers and final norm over one packed sequence (``LlamaModel.forward``'s
    loop, with the packing where its attention mask would go: no [T, T] mask is ever built)."""
    hidden, positions = embeds[None], position_ids[None]
    checkpointing = getattr(decoder, "gradient_checkpointing", False) and decoder.training
    for layer in decoder.layers:
        if checkpointing:  # as LlamaModel.forward calls it: (hidden, mask, positions, cache, attentions, use_cache)
            out = decoder._gradient_checkpointing_func(layer.__call__, hidden, info, positions, None, False, False)
        else:
            out = layer(hidden, attention_mask=info, position_ids=positions)
        hidden = out[0]
    return decoder.norm(hidden)[0]
