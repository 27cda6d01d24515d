"""LLaVA-1.5 (Hugging Face ``LlavaForConditionalGeneration``): its adapter and ``patch_llava``."""

from __future__ import annotations

import functools
import warnings

import torch
from transformers import LlavaForConditionalGeneration, activations
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..constants import DEFAULT_SCALES, IGNORE_INDEX
from ..dispatch import check_backend, triton_interpreting
from ..instance_method import InstanceMethod
from ..layout import pooled_grid
from ..ops.projector.function import matryoshka_project, register_gelu, register_projector
from ..scales import MatryoshkaScales
from . import attention as hf_attention
from . import lm_kernels
from .adapter import ModelAdapter
from .draw import TokenDraw
from .forward import patched_forward, patched_generate
from .inference import image_features
from .lm_kernels import check_choice as check_lm_kernels
from .settings import stored_setting
from .state import PatchState, patch_state, set_state

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


class LlavaAdapter(ModelAdapter):
    """``model.model.{vision_tower, multi_modal_projector, language_model}`` and ``model.lm_head``; each image
    is one pooled square grid."""

    model_type = "llava"

    def vision_tower(self, model):
        return model.model.vision_tower

    def connector(self, model):
        return model.model.multi_modal_projector

    def language_model(self, model):
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def grid(self, model) -> int:
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token, "
                "which has no place on the pooling grid; fastnest supports 'default'"
            )
        return config.vision_config.image_size // config.vision_config.patch_size

    def image_layouts(self, model, spec, pixel_values, image_sizes=None):
        _refuse_image_sizes(image_sizes)
        if pixel_values is None:
            return []
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be [images, channels, height, width], got shape {tuple(pixel_values.shape)}"
            )
        return [pooled_grid(spec)] * pixel_values.shape[0]

    def connector_rows(self, model, features, spec, backend):
        """The projector's output pooled to every scale (the fused kernels when it is linear -> GELU -> linear)."""
        return matryoshka_project(features, self.connector(model), spec, backend)

    def feature_layers(self, model) -> list[int]:
        layer = model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def multimodal(self, model):
        return model.model

    def vision_outputs(
        self,
        model,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        **tower_options,
    ):
        """The tower's outputs, and the configured (or given) layer(s) with CLS dropped by the 'default'
        strategy: ``[N, grid², Dv]``."""
        _refuse_image_sizes(image_sizes)
        config, tower = model.config, self.vision_tower(model)
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        tower_options["output_hidden_states"] = True
        out = tower(pixel_values.to(tower.dtype), return_dict=True, **tower_options)
        feats = [out.hidden_states[i] for i in ([layer] if isinstance(layer, int) else list(layer))]
        if strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return out, torch.cat(feats, dim=-1)

    def vision_features(
        self, model, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None
    ):
        return self.vision_outputs(
            model, pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes=image_sizes
        )[1]

    def dummy_row(self, model) -> dict[str, torch.Tensor]:
        vision = model.config.vision_config
        size = vision.image_size
        height, width = (size, size) if isinstance(size, int) else size
        tokens = (height // vision.patch_size) * (width // vision.patch_size)
        row = torch.tensor([self.image_token_id(model)] * tokens + [model.config.text_config.pad_token_id or 0])
        return {
            "input_ids": row[None],
            "attention_mask": torch.ones(1, len(row), dtype=torch.long),
            "labels": torch.full((1, len(row)), IGNORE_INDEX),
            "pixel_values": torch.zeros(1, 3, height, width),
        }


def _refuse_image_sizes(image_sizes) -> None:
    if image_sizes is not None:
        raise ValueError("image_sizes is not supported: fastnest pools fixed-size LLaVA grids")


LLAVA = LlavaAdapter()
SAMPLING = ("all", "random")  # scales of a training step: every one, or one drawn per step


def patch_llava(
    model: LlavaForConditionalGeneration,
    scales: tuple[int, ...] | None = None,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
    sampling: str = "all",
    seed: int = 0,
    lm_kernels: str = "auto",
) -> LlavaForConditionalGeneration:
    """Make ``model`` train on every Matryoshka scale in one packed forward, and infer at any scale.

    Patches the instance in place and returns it; calling again re-configures. Training (``model.train()``
    with ``labels``): ``loss`` = mean over scales of each scale's token-mean next-token cross-entropy,
    ``scale_losses`` per scale. Inference: ``model(..., scale=s)`` / ``model.generate(..., scale=s)`` show the
    language model each image as its ``s`` pooled tokens (default: ``fastnest.set_scale`` or the largest).
    ``scales`` defaults to the ones stored in ``config.fastnest`` (``fastnest convert``), else ``DEFAULT_SCALES``.

    ``attention``: the backend of the packed training forward, ``"auto"`` (flash, else xformers on CUDA;
    sdpa on CPU) or one of ``"flash"``, ``"xformers"``, ``"flex"``, ``"sdpa"`` (ValueError here when this
    process cannot run it); inference keeps the model's own ``attn_implementation``. ``share_prefix``: a
    row's text before its first image is computed once for all scales (the same loss and gradients).
    ``backend`` forces the kernels of fastnest's projector and loss ("triton", "native", "torch"; None/"auto":
    Triton on CUDA, the native extension on CPU when built, else PyTorch); an unavailable one raises when run.
    ``sampling="random"``: each training step runs ONE of ``scales``, drawn by a generator seeded with ``seed``
    (the same on every process) — the M3 paper's random-scale ablation, and a cheaper step; ``"all"`` (default)
    averages every scale.
    ``lm_kernels``: the language model's RMSNorm, SwiGLU and rotary embedding in the packed training pass:
    ``"native"`` (fastnest._C's fused kernels, CPU), ``"liger"`` (Liger-Kernel's, CUDA; ``pip install
    liger-kernel``), ``"torch"`` (the model's own code) or ``"auto"`` (native on CPU when built, else torch);
    Llama decoders only (a named one raises for others). Inference runs the model's own code.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, LlavaForConditionalGeneration) or model_type != "llava":
        raise TypeError(
            f"patch_llava expects a LlavaForConditionalGeneration of model_type 'llava', got {type(model).__name__} "
            f"({model_type!r}); fastnest.patch picks the patch for a model's type"
        )
    state = pooled_state(LLAVA, model, scales, attention, share_prefix, backend, sampling, seed, lm_kernels)
    return install(model, state)


def pooled_state(
    adapter: ModelAdapter,
    model,
    scales,
    attention: str,
    share_prefix: bool,
    backend: str | None,
    sampling: str = "all",
    seed: int = 0,
    lm_kernels: str = "auto",
) -> PatchState:
    """The patch state of a pooled-grid family (LLaVA, LLaVA-NeXT), its options checked: a ValueError or
    TypeError naming a bad scale set, kernel backend, attention backend, sampling or lm_kernels; a warning for
    flex without CUDA. ``scales=None``: the ones ``fastnest convert`` stored in ``config.fastnest``, else the
    defaults."""
    if scales is None:
        scales = stored_setting(model, "scales", DEFAULT_SCALES)
    if isinstance(scales, (int, str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"scales must be a sequence of ints such as {DEFAULT_SCALES}, got {scales!r}")
    if backend not in (None, "auto"):
        check_backend("projector", backend)
    if backend == "triton" and not torch.cuda.is_available() and not triton_interpreting():
        raise ValueError(
            "backend 'triton' needs CUDA and torch.cuda.is_available() is False (TRITON_INTERPRET=1 runs it on "
            "CPU); here use 'native', 'torch' or 'auto'"
        )
    spec = MatryoshkaScales(adapter.grid(model), scales)
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    draw = None
    if sampling == "random":
        draw = TokenDraw(functools.partial(MatryoshkaScales, spec.grid), spec.scales, 1, seed)
    check_backend("attention", attention)
    if attention == "flex" and not torch.cuda.is_available():
        warnings.warn(
            "attention='flex': FlexAttention's backward needs CUDA, which this process lacks; the packed forward "
            "(fastnest analyze) runs here, a training step will be refused (use attention='sdpa' or 'auto' to train)",
            stacklevel=3,
        )
    kernels = check_lm_kernels(adapter.language_model(model), lm_kernels)
    return PatchState(
        adapter, spec, max(spec.scales), backend, attention, bool(share_prefix), draw=draw, lm_kernels=kernels
    )


def install(model: torch.nn.Module, state: PatchState) -> torch.nn.Module:
    """Attach ``state`` and replace the instance's forward, generate and get_image_features (any adapter)."""
    set_state(model, state)
    hf_attention.route(state.adapter.language_model(model))
    lm_kernels.route(state.adapter.language_model(model))
    inner = state.adapter.multimodal(model)
    inner.get_image_features = InstanceMethod(image_features, inner, type(inner).get_image_features)
    model.forward = InstanceMethod(patched_forward, model, type(model).forward)
    model.generate = InstanceMethod(patched_generate, model, type(model).generate)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore plain Hugging Face behaviour."""
    adapter = patch_state(model).adapter
    hf_attention.unroute(adapter.language_model(model))
    lm_kernels.unroute(adapter.language_model(model))
    adapter.multimodal(model).__dict__.pop("get_image_features", None)
    for name in ("forward", "generate"):
        model.__dict__.pop(name, None)
    set_state(model, None)
    return model


def set_scale(model: torch.nn.Module, scale: int) -> None:
    """Default number of visual tokens per image used at inference when no ``scale`` is passed."""
    set_state(model, patch_state(model).with_scale(scale))
