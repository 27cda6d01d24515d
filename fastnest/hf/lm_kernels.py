"""Fused kernels for the language model's elementwise work (RMSNorm, SwiGLU, rotary embedding) in the packed call.

Patching wraps the ``forward`` of each decoder layer (on the instance). A packed call that carries the
``fastnest_lm_kernels`` kwarg runs the layer as Hugging Face's Llama does, with the fused ops in place of its
norms, its MLP's ``act_fn(gate) * up`` and ``apply_rotary_pos_emb`` (the projections, the residual adds and
fastnest's varlen attention stay as they are): ``"native"``, fastnest._C's kernels (CPU); ``"liger"``,
Liger-Kernel's Triton kernels (CUDA, optional dependency), called as functions on this model's tensors (nothing
of Liger's patches classes or modules). Every other call, and ``"torch"``, runs the layer's own forward.

The last layer computes only the positions whose final hidden states are read, the ``fastnest_rows`` kwarg,
after its attention, and its attention only at each sequence's tail from its first read row where the backend
has tail queries (``fastnest_tail``: ``VarlenInfo.tail_queries``). Keys and values still cover every position.
Those rows are where the loss or the analysis takes logits: in the analysis a few answer tokens after each
scale's visual tokens, so the last layer's attention nearly vanishes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..attention import VarlenInfo, varlen_attention
from ..dispatch import check_backend, resolve_backend
from ..instance_method import InstanceMethod
from ..ops.decoder import function as decoder_ops

KERNELS_KWARG = "fastnest_lm_kernels"
ROWS_KWARG = "fastnest_rows"  # the packed positions whose final hidden states are read (the last layer's rows)
TAIL_KWARG = "fastnest_tail"  # (tail info, picks) of those rows, or None: the last layer's attention queries
VARLEN_KWARG = "fastnest_varlen"  # fastnest.hf.attention's (that module imports this one)
# the Hugging Face classes whose forward the fused layer restates (Llama's decoder layer and its parts)
LAYER_CLASSES = {
    "layer": "LlamaDecoderLayer",
    "self_attn": "LlamaAttention",
    "mlp": "LlamaMLP",
    "input_layernorm": "LlamaRMSNorm",
    "post_attention_layernorm": "LlamaRMSNorm",
}


@dataclass(frozen=True)
class _Ops:
    rms_norm: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache  # built once: each packed call of each layer asks for its ops
def _native_ops() -> _Ops:
    return _Ops(
        rms_norm=lambda x, norm: decoder_ops.rms_norm(x, norm.weight, norm.variance_epsilon),
        swiglu=decoder_ops.swiglu,
        rotary=decoder_ops.rotary,
    )


@functools.cache
def _liger_ops() -> _Ops:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def rotary(q, k, cos, sin):
        # Liger's RoPE takes [batch, heads, T, d] views of a [batch, T, heads, d] storage: the tokens-major layout
        dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k = (t.to(dtype).transpose(0, 1)[None] for t in (q, k))
        q, k = LigerRopeFunction.apply(q, k, cos.to(dtype), sin.to(dtype))
        return q[0].transpose(0, 1), k[0].transpose(0, 1)

    def rms_norm(x, norm):
        # "llama" casting: the normalisation in fp32, the weight multiplying x's dtype (LlamaRMSNorm); not in place,
        # since the incoming gradient may be read elsewhere
        dtype = torch.promote_types(x.dtype, norm.weight.dtype)
        return LigerRMSNormFunction.apply(
            x.to(dtype), norm.weight.to(dtype), norm.variance_epsilon, 0.0, "llama", False
        )

    return _Ops(rms_norm=rms_norm, swiglu=LigerSiLUMulFunction.apply, rotary=rotary)


_OPS = {"native": _native_ops, "liger": _liger_ops}


def _layers(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(getattr(language_model, "layers", ()))


def unsupported(language_model: torch.nn.Module) -> str | None:
    """Why the fused layer cannot stand in for this language model's decoder layers (None when it can)."""
    layers = _layers(language_model)
    if not layers:
        return f"{type(language_model).__name__} has no decoder layers at .layers"
    config = language_model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"the MLP's activation is {getattr(config, 'hidden_act', None)!r}, the fused SwiGLU is silu's"
    for layer in layers:
        for name, cls in LAYER_CLASSES.items():
            module = layer if name == "layer" else getattr(layer, name, None)
            if type(module).__name__ != cls:
                found = type(module).__name__
                return f"the decoder layer's {name} is a {found}, the fused layer restates {cls} (Llama's)"
    return None


def check_choice(language_model: torch.nn.Module, choice: str | None) -> str:
    """Validate ``lm_kernels`` at patch time: None -> "auto"; a named one this process and model can run, else
    ValueError saying why."""
    choice = check_backend("lm_kernels", choice)
    reason = None if choice in ("auto", "torch") else unsupported(language_model)
    if reason is not None:
        raise ValueError(f"lm_kernels {choice!r} is unavailable: {reason}; use 'auto' or 'torch'")
    return choice


def resolve(language_model: torch.nn.Module, choice: str, device: torch.device) -> str:
    """The kernels one packed call runs on ``device`` (``fastnest.dispatch``): "auto" is "native" on CPU when the
    extension is built and the layers are Llama's, else "torch"; a named choice runs or raises."""
    if choice == "auto" and unsupported(language_model) is not None:
        return "torch"
    return resolve_backend("lm_kernels", device, choice)


def _fused_forward(
    layer,
    hidden: torch.Tensor,
    cos,
    sin,
    info: VarlenInfo,
    ops: _Ops,
    rows: torch.Tensor | None = None,
    tail: tuple[VarlenInfo, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Llama's decoder layer over the packed ``[1, T, D]`` hidden states, the fused ops in place of its own.
    ``rows`` (the last layer): only those positions go on past the attention, whose keys and values need every
    position; nothing after this layer reads the others, so ``[1, R, D]`` comes out. ``tail`` (with ``rows``):
    the attention runs at the tails' queries only, and ``picks`` takes the rows from them."""
    x = hidden[0]
    tokens = x.shape[0]
    attn, mlp = layer.self_attn, layer.mlp
    h = ops.rms_norm(x, layer.input_layernorm)
    q, k, v = (proj(h).view(tokens, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = ops.rotary(q, k, cos[0], sin[0])
    dropout = attn.attention_dropout if attn.training else 0.0
    if tail is not None:  # queries at the read rows' tails only; ``picks`` are the rows among them
        # (q is projected and rotated at every position above, in the one rotary call with k, then taken)
        tail_info, picks = tail
        q = q.index_select(0, tail_info.query_index)
        out = varlen_attention(q, k, v, tail_info, scale=attn.scaling, dropout=dropout).index_select(0, picks)
    else:
        out = varlen_attention(q, k, v, info, scale=attn.scaling, dropout=dropout)
        out = out if rows is None else out.index_select(0, rows)
    if rows is not None:
        x = x.index_select(0, rows)
    x = x + attn.o_proj(out.reshape(x.shape[0], -1))
    h = ops.rms_norm(x, layer.post_attention_layernorm)
    return (x + mlp.down_proj(ops.swiglu(mlp.gate_proj(h), mlp.up_proj(h))))[None]


def _layer_forward(self, hidden_states, *args, last: bool = False, **kwargs):
    kernels, rows, tail = (kwargs.pop(name, None) for name in (KERNELS_KWARG, ROWS_KWARG, TAIL_KWARG))
    if kernels in (None, "torch"):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    info, embeddings = kwargs.get(VARLEN_KWARG), kwargs.get("position_embeddings")
    if info is None or embeddings is None:
        raise ValueError("the fused decoder layer runs packed calls only (varlen info and position embeddings)")
    reads = {"rows": rows, "tail": tail} if last else {}
    run = functools.partial(_fused_forward, self, info=info, ops=_OPS[kernels](), **reads)
    if _checkpoints_class_forward(self):
        return self._gradient_checkpointing_func(run, hidden_states, *embeddings)
    return run(hidden_states, *embeddings)


def _checkpoints_class_forward(layer: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on for ``layer`` and lives in its class's ``forward``, which the instance
    forward bypasses (newer transformers 5.x; earlier ones checkpoint in ``__call__``, around the instance forward)."""
    return (
        isinstance(layer, GradientCheckpointingLayer)
        and "__call__" not in GradientCheckpointingLayer.__dict__
        and layer.gradient_checkpointing
        and layer.training
        and torch.is_grad_enabled()
    )


def route(language_model: torch.nn.Module) -> None:
    layers = _layers(language_model)
    for i, layer in enumerate(layers):
        layer.forward = InstanceMethod(functools.partial(_layer_forward, last=i == len(layers) - 1), layer)


def unroute(language_model: torch.nn.Module) -> None:
    for layer in _layers(language_model):
        layer.__dict__.pop("forward", None)
