"""fastnest: Matryoshka multimodal training and inference in one packed pass."""

from .attention import VarlenInfo, varlen_attention
from .connectors import MatryoshkaProjector
from .constants import DEFAULT_SCALES, IGNORE_INDEX
from .hf import PATCHES, MatryoshkaCausalLMOutput, patch, patch_llava, set_scale, unpatch
from .ops.cross_entropy.function import fused_linear_cross_entropy
from .ops.cross_entropy.naive import grouped_cross_entropy
from .ops.pooling.naive import multiscale_pool
from .ops.projector.function import matryoshka_project
from .packing import MatryoshkaPlan, PackedSequences, pack_sequences, pad_packed, plan_matryoshka
from .scales import MatryoshkaScales, allowed_scales

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCALES",
    "IGNORE_INDEX",
    "MatryoshkaCausalLMOutput",
    "MatryoshkaPlan",
    "MatryoshkaProjector",
    "MatryoshkaScales",
    "PATCHES",
    "PackedSequences",
    "VarlenInfo",
    "allowed_scales",
    "fused_linear_cross_entropy",
    "grouped_cross_entropy",
    "matryoshka_project",
    "multiscale_pool",
    "pack_sequences",
    "pad_packed",
    "patch",
    "patch_llava",
    "plan_matryoshka",
    "set_scale",
    "unpatch",
    "varlen_attention",
]
