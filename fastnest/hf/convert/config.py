"""An original-format LLaVA ``config.json`` (``LlavaLlamaForCausalLM``, ``model_type`` ``llava_llama``), read
and checked, and the Hugging Face config it becomes: ``LlavaConfig`` (LLaVA-1.5, ``pad``/``square`` images),
``LlavaNextConfig`` (``anyres`` with ``spatial_unpad``) or ``MQTLlavaConfig`` (``query_abstractor_type``)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

from ...scales import MatryoshkaScales
from ..mqt_model import MQTLlavaConfig
from ..settings import store_settings

ORIGINAL_MODEL_TYPE = "llava_llama"
PROJECTOR = "mlp2x_gelu"  # linear -> GELU -> linear: Hugging Face's LlavaMultiModalProjector
QUERY_TRANSFORMER = "matry_query"
QUERY_HEADS = 16  # hard-wired in the MQT release's builder (not in its config.json)
FEATURES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> vision_feature_select_strategy
ASPECTS = ("pad", "square", "anyres")
# fields of the original config that are LLaVA's, not the language model's
LLAVA_FIELDS = {
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "matryoshka_vis_token_scale",
    "query_abstractor_type",
    "num_visual_tokens",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
}
KINDS = ("llava", "llava_next", "mqt_llava")


@dataclass(frozen=True)
class Original:
    """What an original checkpoint's config says, in Hugging Face's terms."""

    kind: str  # one of KINDS
    text: dict  # LlamaConfig options
    vision_tower: str  # mm_vision_tower: a hub name or a directory
    feature_layer: int
    strategy: str  # vision_feature_select_strategy
    pad: bool  # images padded to a square (image_aspect_ratio 'pad') before the CLIP preprocessing
    pinpoints: list[list[int]] | None  # anyres: (height, width) pairs, Hugging Face's order
    scales: list[int] | None  # M3's matryoshka_vis_token_scale
    num_visual_tokens: object  # MQT's num_visual_tokens (None, a stage name or a count)
    dtype: torch.dtype | None  # the checkpoint's torch_dtype


def read_original(src: Path) -> Original:
    """The checkpoint's config.json, checked: ValueError naming what does not describe a convertible LLaVA."""
    path = src / "config.json"
    if not path.is_file():
        raise ValueError(f"{src}: no config.json; expected an original-format LLaVA checkpoint directory")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type in KINDS:
        raise ValueError(
            f"{path}: model_type {model_type!r} is already Hugging Face's format; load it with from_pretrained"
        )
    if model_type != ORIGINAL_MODEL_TYPE or "mm_vision_tower" not in config:
        raise ValueError(
            f"{path}: not an original-format LLaVA checkpoint (model_type {model_type!r}, "
            f"mm_vision_tower {'present' if 'mm_vision_tower' in config else 'absent'}); expected model_type "
            f"{ORIGINAL_MODEL_TYPE!r} (LlavaLlamaForCausalLM) with mm_vision_tower"
        )
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{path}: mm_use_im_start_end=True (image start/end tokens) has no Hugging Face equivalent")
    kind = _kind(path, config)
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in FEATURES:
        raise ValueError(f"{path}: mm_vision_select_feature {feature!r}; supported: {sorted(FEATURES)}")
    layer = config.get("mm_vision_select_layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{path}: mm_vision_select_layer must be an int (the released scripts pass -2), got {layer!r}")
    aspect = config.get("image_aspect_ratio") or "square"  # the release's default
    pinpoints = _pinpoints(path, config) if kind == "llava_next" else None
    scales = config.get("matryoshka_vis_token_scale")
    if scales is not None and (not isinstance(scales, list) or not all(isinstance(s, int) for s in scales)):
        raise ValueError(f"{path}: matryoshka_vis_token_scale must be a list of ints such as [576, 144, 36, 9, 1]")
    text = {k: v for k, v in config.items() if k not in LLAVA_FIELDS and not k.startswith("mm_")}
    if "torch_dtype" in text:  # the name older transformers saved
        text["dtype"] = text.pop("torch_dtype")
    if text.get("rope_scaling", 0) is None:  # an absent scaling, in the deprecated name
        del text["rope_scaling"]
    return Original(
        kind=kind,
        text=text,
        vision_tower=config["mm_vision_tower"],
        feature_layer=layer,
        strategy=FEATURES[feature],
        pad=aspect == "pad",
        pinpoints=pinpoints,
        scales=scales,
        num_visual_tokens=config.get("num_visual_tokens"),
        dtype=_dtype(path, text.get("dtype")),
    )


def _dtype(path: Path, name: str | None) -> torch.dtype | None:
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name is not None else None
    if name is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}: torch_dtype {name!r} is not a torch dtype (e.g. 'bfloat16')")
    return dtype


def _kind(path: Path, config: dict) -> str:
    aspect = config.get("image_aspect_ratio") or "square"
    if aspect not in ASPECTS:
        raise ValueError(f"{path}: image_aspect_ratio {aspect!r}; supported: {', '.join(ASPECTS)}")
    merge = config.get("mm_patch_merge_type", "flat")
    query = config.get("query_abstractor_type")
    if query is not None:
        if query != QUERY_TRANSFORMER:
            raise ValueError(f"{path}: query_abstractor_type {query!r}; supported: {QUERY_TRANSFORMER!r} (MQT-LLaVA)")
        if aspect == "anyres":
            raise ValueError(f"{path}: an MQT-LLaVA with anyres images; mqt_llava reads one fixed-size image")
        return "mqt_llava"
    projector = config.get("mm_projector_type", "linear")  # the release's default
    if projector != PROJECTOR:
        raise ValueError(
            f"{path}: mm_projector_type {projector!r} has no Hugging Face LLaVA equivalent; supported: {PROJECTOR!r} "
            "(linear -> GELU -> linear, LlavaMultiModalProjector)"
        )
    if aspect != "anyres":
        return "llava"  # the release arranges a pad/square image flat whatever the merge type
    if merge != "spatial_unpad":
        raise ValueError(
            f"{path}: anyres with mm_patch_merge_type {merge!r}; Hugging Face's LLaVA-NeXT arranges crops as "
            "'spatial_unpad' (unpadded, a newline per row)"
        )
    return "llava_next"


def _pinpoints(path: Path, config: dict) -> list[list[int]]:
    """The anyres resolutions as (height, width): the release reads each pair as (width, height)."""
    raw = config.get("image_grid_pinpoints")
    pairs = ast.literal_eval(raw) if isinstance(raw, str) else raw  # the release accepts both
    if not isinstance(pairs, (list, tuple)) or not pairs or not all(_is_pair(p) for p in pairs):
        raise ValueError(f"{path}: anyres needs image_grid_pinpoints, a list of [width, height] pairs, got {raw!r}")
    return [[int(height), int(width)] for width, height in pairs]


def _is_pair(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)


def vision_config(tower_dir: Path) -> CLIPVisionConfig:
    """The CLIP tower's config (a ``CLIPVisionConfig``, or a ``CLIPConfig``'s vision part)."""
    config = json.loads((tower_dir / "config.json").read_text()) if (tower_dir / "config.json").is_file() else {}
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        raise ValueError(
            f"{tower_dir}: not a CLIP directory (config.json model_type {config.get('model_type')!r}); the released "
            "LLaVA towers are CLIP (e.g. openai/clip-vit-large-patch14-336)"
        )
    return CLIPVisionConfig.from_pretrained(tower_dir)


def text_config(original: Original, **options) -> LlamaConfig:
    """The language model's config (``options`` override the checkpoint's)."""
    return LlamaConfig(**{**original.text, **options})


def hf_config(
    original: Original,
    vision: CLIPVisionConfig,
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    num_queries: int | None,
):
    """The Hugging Face config of the converted model, with the Matryoshka settings in ``config.fastnest``."""
    text = text_config(original, vocab_size=vocab_size, pad_token_id=pad_token_id)
    grid = vision.image_size // vision.patch_size
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": image_token_id,
        "vision_feature_layer": original.feature_layer,
        "vision_feature_select_strategy": original.strategy,
        "image_seq_length": grid * grid,
        "tie_word_embeddings": text.tie_word_embeddings,
    }
    if original.kind == "mqt_llava":
        config = MQTLlavaConfig(num_queries=num_queries, query_heads=QUERY_HEADS, query_keys="positional", **common)
    elif original.kind == "llava_next":
        config = LlavaNextConfig(image_grid_pinpoints=original.pinpoints, projector_hidden_act="gelu", **common)
    else:
        config = LlavaConfig(projector_hidden_act="gelu", **common)
    if original.dtype is not None:
        config.dtype = original.dtype
    settings = _settings(original, grid, num_queries)
    if settings:
        store_settings(config, **settings)
    return config


def _settings(original: Original, grid: int, num_queries: int | None) -> dict:
    if original.scales is not None:
        MatryoshkaScales(grid, original.scales)  # ValueError naming the scales this grid allows
        return {"scales": list(original.scales)}
    stage = original.num_visual_tokens
    if stage is None:
        return {}
    if stage == "second_stage":  # one count per step from 2, 4, ..., M
        return {"num_tokens": "released"}
    if stage == "first_stage":  # stage 1 trains every query
        return {"num_tokens": [num_queries]}
    try:
        count = int(stage)
    except (TypeError, ValueError):
        raise ValueError(
            f"num_visual_tokens {stage!r}: expected 'first_stage', 'second_stage' or a count 1..{num_queries}"
        ) from None
    if not 1 <= count <= num_queries:
        raise ValueError(f"num_visual_tokens {stage!r}: a count must be in 1..{num_queries}")
    return {"num_tokens": [count]}
