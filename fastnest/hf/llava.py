"""``patch_llava``: a thin adapter from Hugging Face ``LlavaForConditionalGeneration`` to fastnest's math."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, replace

import torch
from transformers import LlavaForConditionalGeneration, activations
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaMultiModalProjector

from ..attention import VarlenInfo
from ..dispatch import BACKENDS, check_backend, resolve_backend
from ..ops.cross_entropy.function import fused_linear_cross_entropy
from ..ops.cross_entropy.naive import grouped_cross_entropy
from ..ops.projector.function import matryoshka_project, register_gelu, register_projector
from ..packing import pad_packed, plan_matryoshka
from ..scales import DEFAULT_SCALES, MatryoshkaScales
from . import attention as hf_attention

# LLaVA's projector is linear_1 -> act -> linear_2: the fused projector kernels compute it when act is a GELU.
register_projector(LlavaMultiModalProjector, lambda m: (m.linear_1, m.act, m.linear_2))
# GELUActivation is F.gelu or its erf formula in Python (the same function); the others are its tanh form, written
# out or not. PytorchGELUTanh is GELUTanh's name in older transformers.
for _name, _approximate in (
    ("GELUActivation", "none"),
    ("GELUTanh", "tanh"),
    ("PytorchGELUTanh", "tanh"),
    ("NewGELUActivation", "tanh"),
):
    if hasattr(activations, _name):
        register_gelu(getattr(activations, _name), lambda m, a=_approximate: a)


@dataclass
class MatryoshkaCausalLMOutput(LlavaCausalLMOutputWithPast):
    """LLaVA output plus ``scale_losses`` (training: detached per-scale losses in ``scales`` order) and
    ``attention_mask`` (inference with images: the mask of the shortened sequence the model saw).

    The training step returns no ``logits``: its loss is computed from the hidden states in chunks, and no
    logits tensor ever exists in full."""

    scale_losses: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class _State:
    spec: MatryoshkaScales
    scale: int  # default inference scale
    attn_inner: str
    backend: str | None  # kernels for fastnest's own ops (fastnest.dispatch); None: chosen per device
    attention: str  # backend of the packed training forward ("auto" or a name in fastnest.attention.BACKENDS)
    share_prefix: bool


def _state(model: torch.nn.Module) -> _State:
    state = getattr(model, "_fastnest", None)
    if state is None:
        raise ValueError("model is not patched by fastnest; call fastnest.patch_llava(model) first")
    return state


def _grid(config) -> int:
    vision = config.vision_config
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token, which "
            "has no place on the pooling grid; fastnest supports 'default'"
        )
    return vision.image_size // vision.patch_size


def patch_llava(
    model: LlavaForConditionalGeneration,
    scales: tuple[int, ...] = DEFAULT_SCALES,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
) -> LlavaForConditionalGeneration:
    """Make ``model`` train on every Matryoshka scale in one packed forward, and infer at any scale.

    Patches the instance in place and returns it; calling again re-configures. Training (``model.train()``
    with ``labels``): ``loss`` = mean over scales of each scale's token-mean next-token cross-entropy,
    ``scale_losses`` per scale. Inference: ``model(..., scale=s)`` / ``model.generate(..., scale=s)`` show the
    language model each image as its ``s`` pooled tokens (default: ``fastnest.set_scale`` or the largest).

    ``attention``: the backend of the packed training forward, ``"auto"`` (flash, else xformers on CUDA;
    sdpa on CPU) or one of ``"flash"``, ``"xformers"``, ``"flex"``, ``"sdpa"`` (ValueError here when this
    process cannot run it); inference keeps the model's own ``attn_implementation``. ``share_prefix``: a
    row's text before its first image is computed once for all scales (the same loss and gradients).
    ``backend`` forces the kernels of fastnest's projector and loss ("triton", "native", "torch"; None/"auto":
    Triton on CUDA, the native extension on CPU when built, else PyTorch); an unavailable one raises when run.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"patch_llava expects a LlavaForConditionalGeneration, got {type(model).__name__}")
    if backend not in (None, "auto", *BACKENDS):
        raise ValueError(f"backend {backend!r} is not one of {(None, 'auto', *BACKENDS)}")
    spec = MatryoshkaScales(_grid(model.config), scales)
    check_backend("attention", attention)
    text_config = model.config.text_config
    previous = getattr(model, "_fastnest", None)
    inner = previous.attn_inner if previous else text_config._attn_implementation or "eager"
    text_config._attn_implementation = hf_attention.register(inner)
    model._fastnest = _State(
        spec=spec,
        scale=max(spec.scales),
        attn_inner=inner,
        backend=backend,
        attention=attention,
        share_prefix=bool(share_prefix),
    )
    model.forward = _bind(model, _forward, type(model).forward)
    model.generate = _bind(model, _generate, type(model).generate)
    return model


def _bind(model, impl, original) -> types.MethodType:
    """``impl`` as a method of this instance, carrying ``original``'s signature (generate inspects it).

    A bound method (not a closure) so that ``copy.deepcopy`` rebinds it to the copy.
    """

    def method(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    return types.MethodType(functools.update_wrapper(method, original), model)


def unpatch(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Restore plain Hugging Face behaviour."""
    state = _state(model)
    model.config.text_config._attn_implementation = state.attn_inner
    for name in ("forward", "generate", "_fastnest"):
        model.__dict__.pop(name, None)
    return model


def set_scale(model: LlavaForConditionalGeneration, scale: int) -> None:
    """Default number of visual tokens per image used at inference when no ``scale`` is passed."""
    state = _state(model)
    state.spec.index(scale)
    model._fastnest = replace(state, scale=scale)


def _vision_features(model, pixel_values: torch.Tensor, layer, strategy) -> torch.Tensor:
    """Vision tower features of the configured layer(s), CLS dropped: ``[N, grid*grid, Dv]``."""
    tower = model.model.vision_tower
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    feats = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        feats = [f[:, 1:] for f in feats]
    return torch.cat(feats, dim=-1)


def _pop_vision_kwargs(kwargs: dict) -> dict:
    """The per-call vision options LLaVA's forward takes (None = use the config's)."""
    return {k: kwargs.pop(k, None) for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")}


def _given_or(value, default):
    return default if value is None else value


def _plan_and_source(model, input_ids, attention_mask, labels, pixel_values, spec, vision_kwargs, share_prefix=False):
    """Plan the sequences and build the source rows ``[text; visual (every scale of every image); pad]``."""
    config = model.config
    if vision_kwargs.get("image_sizes") is not None:
        raise ValueError("image_sizes is not supported: fastnest pools fixed-size LLaVA grids")
    num_images = 0 if pixel_values is None else pixel_values.shape[0]
    plan = plan_matryoshka(
        input_ids,
        attention_mask,
        labels,
        image_token_id=config.image_token_id,
        spec=spec,
        num_images=num_images,
        share_prefix=share_prefix,
    )
    embed = model.get_input_embeddings()
    device = embed.weight.device
    parts = [embed(input_ids[plan.text_mask.to(input_ids.device)].to(device))]
    if num_images:
        layer = _given_or(vision_kwargs.get("vision_feature_layer"), config.vision_feature_layer)
        strategy = _given_or(vision_kwargs.get("vision_feature_select_strategy"), config.vision_feature_select_strategy)
        feats = _vision_features(model, pixel_values, layer, strategy)
        visual = matryoshka_project(feats, model.model.multi_modal_projector, spec, _state(model).backend)
        parts.append(visual.reshape(-1, visual.shape[-1]).to(device, parts[0].dtype))
    parts.append(parts[0].new_zeros(1, parts[0].shape[-1]))  # padding row for padded layouts
    return plan, torch.cat(parts)


def _train_step(model, input_ids, attention_mask, pixel_values, labels, num_items_in_batch, vision_kwargs):
    state = _state(model)
    spec = state.spec
    plan, source = _plan_and_source(
        model, input_ids, attention_mask, labels, pixel_values, spec, vision_kwargs, state.share_prefix
    )
    device = source.device
    packed = plan.packed.to(device)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else source.dtype
    backend = resolve_backend("attention", device, state.attention, dtype=dtype, backward=torch.is_grad_enabled())
    info = VarlenInfo.from_packed(packed, device, backend)
    with hf_attention.packed_forward():
        out = model.model.language_model(
            inputs_embeds=source[packed.source_index][None],
            position_ids=packed.position_ids[None],
            use_cache=False,
            **{hf_attention.VARLEN_KWARG: info},
        )
    head = model.lm_head
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"the fastnest training step reads lm_head's weight for its fused loss and needs an nn.Linear, "
            f"got {type(head).__name__}"
        )
    # Hidden states at labelled positions only; the fused loss never holds more than one chunk of their logits.
    hidden = out.last_hidden_state[0][packed.logit_index].to(head.weight.device)
    loss, per_scale = fused_linear_cross_entropy(
        hidden,
        head.weight,
        packed.targets.to(head.weight.device),
        packed.target_group.to(head.weight.device),
        len(spec.scales),
        bias=head.bias,
        num_items=num_items_in_batch,
        backend=_state(model).backend,
    )
    return MatryoshkaCausalLMOutput(loss=loss, scale_losses=per_scale.detach())


def _padding_left(attention_mask: torch.Tensor | None) -> bool:
    if attention_mask is None:
        return False
    return not bool((attention_mask[:, -1] == 0).any()) and bool((attention_mask[:, 0] == 0).any())


def _scaled_inputs(model, input_ids, attention_mask, pixel_values, labels, scale, left, vision_kwargs):
    """The batch as the language model sees it at ``scale``: padded embeddings, mask, ids and the plan."""
    state = _state(model)
    spec = state.spec.only(state.scale if scale is None else scale)
    plan, source = _plan_and_source(model, input_ids, attention_mask, labels, pixel_values, spec, vision_kwargs)
    index, mask, where = pad_packed(plan.packed, pad_index=source.shape[0] - 1, left=left)
    # Token ids of that sequence (placeholders at pooled positions), for generate's bookkeeping; built where
    # input_ids live, so a plain forward pays no device-to-host copy for it.
    ids_device = input_ids.device
    ids_source = torch.cat(
        [
            input_ids[plan.text_mask.to(ids_device)],
            torch.full((source.shape[0] - 1 - plan.num_text,), model.config.image_token_id, device=ids_device),
            torch.tensor([model.config.text_config.pad_token_id or 0], device=ids_device),
        ]
    )
    device = source.device
    return source[index.to(device)], mask.to(device), ids_source[index.to(ids_device)], plan, where


def _forward(
    self,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    labels=None,
    scale: int | None = None,
    num_items_in_batch=None,
    **kwargs,
):
    vision_kwargs = _pop_vision_kwargs(kwargs)
    cls_forward = type(self).forward
    if self.training and labels is not None:
        for name in ("inputs_embeds", "past_key_values", "position_ids"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by the fastnest training step; pass input_ids and pixel_values"
                )
        if scale is not None:
            raise ValueError(
                f"scale={scale} is for inference; training always runs every scale {_state(self).spec.scales}"
            )
        return _train_step(self, input_ids, attention_mask, pixel_values, labels, num_items_in_batch, vision_kwargs)
    if pixel_values is None:  # text-only or a decode step with a KV cache: nothing to pool
        if scale is not None:
            _state(self).spec.index(scale)
        extra = {**vision_kwargs, "num_items_in_batch": num_items_in_batch}
        return cls_forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            **kwargs,
            **{k: v for k, v in extra.items() if v is not None},
        )
    if input_ids is None or kwargs.get("position_ids") is not None:
        raise ValueError("with pixel_values, fastnest needs input_ids and builds position_ids itself")
    embeds, mask, _, plan, where = _scaled_inputs(
        self, input_ids, attention_mask, pixel_values, labels, scale, _padding_left(attention_mask), vision_kwargs
    )
    out = cls_forward(self, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    loss = None
    if labels is not None:
        packed = plan.packed.to(embeds.device)
        flat = out.logits.reshape(-1, out.logits.shape[-1])[where.to(embeds.device)[packed.logit_index]]
        loss, _ = grouped_cross_entropy(flat, packed.targets, packed.target_group, 1, num_items_in_batch)
    return MatryoshkaCausalLMOutput(
        loss=loss,
        logits=out.logits,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        attention_mask=mask,
    )


def _generate(self, inputs=None, *args, scale: int | None = None, **kwargs):
    cls_generate = type(self).generate
    pixel_values = kwargs.pop("pixel_values", None)
    input_ids = kwargs.pop("input_ids", inputs)
    if pixel_values is None:
        if scale is not None:
            _state(self).spec.index(scale)
        return cls_generate(self, input_ids, *args, **kwargs)
    vision_kwargs = _pop_vision_kwargs(kwargs)
    embeds, mask, ids, _, _ = _scaled_inputs(
        self, input_ids, kwargs.pop("attention_mask", None), pixel_values, None, scale, True, vision_kwargs
    )
    out = cls_generate(self, *args, input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    # Report the caller's prompt (576 placeholders per image), then the new tokens.
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    full = torch.cat([input_ids, sequences[:, ids.shape[1] :]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
