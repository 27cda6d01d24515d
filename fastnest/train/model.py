"""Building, loading and saving the model a run trains: a Hugging Face LLaVA (LLaVA-NeXT, MQT-LLaVA) directory
plus fastnest settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from ..hf import MQTLlavaConfig, MQTLlavaForConditionalGeneration, patch, processor_for_queries
from ..hf.tiny import tiny_llava, tiny_llava_next
from ..scales import DEFAULT_SCALES
from .query_counts import log_spaced_counts
from .tiny_processor import NEXT_PINPOINTS, PATCH_SIZE, synthetic_next_processor, synthetic_processor

SETTINGS_FILE = "fastnest.json"
MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "mqt_llava": MQTLlavaForConditionalGeneration,
}
CONNECTOR_OF = {"llava": "pooled", "llava_next": "pooled", "mqt_llava": "mqt"}  # model_type -> its --connector
ARCH_OF = {"llava": "llava", "llava_next": "llava-next"}  # model_type -> the --arch of the built-in model like it


def default_model(vocab: int, image_token_id: int, seed: int = 0) -> LlavaForConditionalGeneration:
    """The built-in run's model: a 1-layer CLIP-style tower on 2-pixel patches (24x24 grid) and a 2-layer Llama.

    The tower's last layer is the feature layer (LLaVA's default, -2, would compute a layer nobody reads). The
    Llama has 2 heads of 32 dimensions and RoPE base 1e6, so more of each head rotates slowly enough to match
    content across ~600 visual tokens: with 4 heads of 16 and base 1e4, every scale's loss stayed equal for
    600 steps (it read only the background) on data where 2 heads of 32 with base 1e6 learned the dot.
    """
    torch.manual_seed(seed)
    model = tiny_llava(
        grid=24,
        patch_size=PATCH_SIZE,
        vision_hidden=32,
        vision_layers=1,
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=1,
        rope_theta=1e6,
        vocab=vocab,
        image_token_id=image_token_id,
    )
    model.config.vision_feature_layer = -1
    return model


def default_model_and_processor(seed: int = 0):
    processor = synthetic_processor()
    tok = processor.tokenizer
    return default_model(len(tok), tok.image_token_id, seed), processor


def default_next_model_and_processor(seed: int = 0):
    """The built-in LLaVA-NeXT: the built-in LLaVA's tower (48-pixel crops, 24x24 grid) and Llama, anyres on
    ``NEXT_PINPOINTS``; a ``LlavaNextProcessor`` writing each image's full-scale placeholder count."""
    processor = synthetic_next_processor()
    tok = processor.tokenizer
    base = default_model(len(tok), tok.image_token_id, seed)
    text, vision = base.config.text_config, base.config.vision_config
    torch.manual_seed(seed)
    model = tiny_llava_next(
        grid=vision.image_size // vision.patch_size,
        patch_size=vision.patch_size,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_hidden=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        rope_theta=text.rope_parameters["rope_theta"],
        vocab=len(tok),
        image_token_id=tok.image_token_id,
    )
    model.config.vision_feature_layer = base.config.vision_feature_layer
    return model, processor


def default_mqt_model_and_processor(seed: int, num_queries: int, query_keys: str):
    """The built-in MQT-LLaVA: the built-in LLaVA's tower and Llama, a query transformer of ``num_queries``
    queries (4 heads over the tower's 32 channels) in place of its projector; a processor writing M placeholders
    per image."""
    try:
        processor = processor_for_queries(synthetic_processor(), num_queries)
    except ValueError as e:
        raise ValueError(f"--num-queries {num_queries}: {e}") from None
    tok = processor.tokenizer
    base = default_model(len(tok), tok.image_token_id, seed).config
    config = MQTLlavaConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=tok.image_token_id,
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy="default",
        num_queries=num_queries,
        query_heads=4,
        query_keys=query_keys,
    )
    config._attn_implementation = base._attn_implementation
    torch.manual_seed(seed)
    return MQTLlavaForConditionalGeneration(config), processor


def model_type_of(path: str | Path) -> str | None:
    """``model_type`` of a Hugging Face model directory's config.json (None when it names none)."""
    return json.loads((Path(path) / "config.json").read_text()).get("model_type")


def connector_of(model) -> str:
    """The ``--connector`` that trains ``model``: ``"pooled"`` (LLaVA) or ``"mqt"`` (MQT-LLaVA)."""
    return CONNECTOR_OF.get(model.config.model_type, "pooled")


def load_model_and_processor(path: str | Path, dtype: torch.dtype | str | None = None, meta: bool = False):
    """A Hugging Face LLaVA or MQT-LLaVA (``model_type`` mqt_llava) directory (weights, config, processor), as
    saved by ``save_run_model``.

    ``meta``: the model is built from its config on the meta device and no weights are read (an FSDP2 rank
    other than 0, whose shards ``fastnest.train.distributed.wrap`` fills from rank 0).

    ``meta``: the model is built from its config on the meta device and no weights are read (an FSDP2 rank
    other than 0, whose shards ``fastnest.train.distributed.wrap`` fills from rank 0).

    The weights load in float32 unless ``dtype`` names another (a torch dtype, or ``"auto"`` for the stored
    one). transformers 5 reads ``dtype=None`` as "auto", so a checkpoint stored in fp16/bf16 would train with
    half-precision master weights (AdamW state in fp16, eps 1e-8 rounding to 0) and bf16 autocast over them
    would compute in their dtype; half compute comes from autocast or FSDP's mixed-precision policy instead.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: not a Hugging Face model directory (no config.json)")
    if not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or None (float32), got {dtype!r}")
    dtype = torch.float32 if dtype is None else dtype
    model_class = MODEL_CLASSES.get(model_type_of(path), LlavaForConditionalGeneration)
    if meta:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = model_class._from_config(config, dtype=_stored(config) if dtype == "auto" else dtype)
    else:
        model = model_class.from_pretrained(path, dtype=dtype)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: no usable processor/tokenizer saved beside the weights ({e})") from e
    return model, processor


def _stored(config) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (``dtype="auto"``); float32 when the config says none."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def read_settings(path: str | Path) -> dict:
    """fastnest settings saved beside a checkpoint (``{}`` when there are none)."""
    file = Path(path) / SETTINGS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def load_patched(path: str | Path, scales: tuple[int, ...] | None = None, dtype: torch.dtype | str | None = None):
    """Load a run's model and processor (float32 unless ``dtype`` says otherwise) and patch it with the saved
    (or given) scales; an MQT-LLaVA with the given token counts, else the log-spaced ones up to M, as fixed
    counts (``training_spec()`` is then those counts: what the analysis evaluates)."""
    model, processor = load_model_and_processor(path, dtype)
    if connector_of(model) == "mqt":
        counts = tuple(scales) if scales else log_spaced_counts(model.config.num_queries)
        try:
            return patch(model, num_tokens=counts), processor
        except ValueError as e:
            raise ValueError(f"--scales {','.join(map(str, counts))}: {e}") from None
    chosen = tuple(scales or read_settings(path).get("scales") or DEFAULT_SCALES)
    return patch(model, scales=chosen), processor


def save_run_model(model, processor, path: str | Path, settings: dict, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) for weights and processor, fastnest settings beside them."""
    path = Path(path)
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(path)
    (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
