"""fastnest: Matryoshka multimodal training and inference in one packed pass.

The core (scales, layouts, the plan, packing, attention, the loss, connectors, ops) imports without
transformers; the Hugging Face side (``fastnest.hf``: ``patch_llava``, ``patch``, ``unpatch``, ...) is
imported on first use of one of its names.
"""

from .anyres import anyres_layout
from .attention import VarlenInfo, varlen_attention
from .connectors import MatryoshkaProjector, MatryoshkaQueryTransformer
from .constants import DEFAULT_SCALES, IGNORE_INDEX
from .layout import ImageLayout, pooled_grid, query_prefix
from .ops.cross_entropy.function import fused_linear_cross_entropy
from .ops.cross_entropy.naive import grouped_cross_entropy
from .ops.pooling.naive import multiscale_pool
from .ops.projector.function import matryoshka_project
from .packing import PackedSequences, pack_sequences, pad_packed
from .plan import MatryoshkaPlan, plan_matryoshka
from .scales import MatryoshkaScales, QueryCounts, allowed_scales
from .step import StepOutput, packed_step, step_loss
from .version import __version__

_HF_NAMES = (
    "PATCHES",
    "MQTLlavaConfig",
    "MQTLlavaForConditionalGeneration",
    "MatryoshkaCausalLMOutput",
    "PatchState",
    "load_router",
    "patch",
    "patch_llava",
    "patch_llava_next",
    "patch_mqt_llava",
    "patch_state",
    "processor_at_scale",
    "processor_for_queries",
    "route_scales",
    "scaled_inputs",
    "set_scale",
    "unpatch",
)


def __getattr__(name: str):
    if name in _HF_NAMES:  # importing fastnest.hf imports transformers: only when asked for
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'fastnest' has no attribute {name!r}")


__all__ = [
    "DEFAULT_SCALES",
    "__version__",
    "IGNORE_INDEX",
    "ImageLayout",
    "MatryoshkaPlan",
    "MatryoshkaProjector",
    "MatryoshkaQueryTransformer",
    "MatryoshkaScales",
    "PackedSequences",
    "QueryCounts",
    "StepOutput",
    "VarlenInfo",
    "allowed_scales",
    "anyres_layout",
    "fused_linear_cross_entropy",
    "grouped_cross_entropy",
    "matryoshka_project",
    "multiscale_pool",
    "pack_sequences",
    "packed_step",
    "pad_packed",
    "plan_matryoshka",
    "pooled_grid",
    "query_prefix",
    "step_loss",
    "varlen_attention",
    *_HF_NAMES,
]
