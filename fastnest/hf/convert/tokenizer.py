"""The converted tokenizer and processor.

The original code splices each image at id -200, which no tokenizer writes; Hugging Face's LLaVA needs an image
token. As its own conversion (``convert_llava_weights_to_hf.py``) does: add ``<image>`` (a special token) and a
``<pad>`` pad token, and grow the vocabulary to a multiple of 64 rows. The processor reads the CLIP tower's
preprocessing and pads each image to a square first when the release does (``image_aspect_ratio`` ``pad``:
``expand2square`` with the mean colour), or, for LLaVA-NeXT, cuts it into the anyres crops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import AddedToken, AutoTokenizer, LlavaNextProcessor, LlavaProcessor

try:  # the PIL-backed classes: no torchvision needed
    from transformers import LlavaImageProcessorPil as LlavaImageProcessor
    from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
except ImportError:  # transformers 5.0
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor

from ..processor import processor_for_queries
from .config import Original

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCABULARY_MULTIPLE = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# the CLIP preprocessing options the LLaVA image processors share
IMAGE_OPTIONS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def converted_tokenizer(src: Path, text_config):
    """The checkpoint's tokenizer with the image and pad tokens added (``text_config``: the language model's,
    for a tokenizer_config.json that names no class; src's config.json is not one transformers knows)."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{src}: no tokenizer ({', '.join(TOKENIZER_FILES)}); the released checkpoints ship their LLM's "
            "(copy e.g. lmsys/vicuna-7b-v1.5's tokenizer files into it)"
        )
    tokenizer = AutoTokenizer.from_pretrained(src, config=text_config)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def vocabulary_rows(tokenizer, rows: int) -> int:
    """Rows of the converted embedding: the checkpoint's ``rows`` grown to hold every token id, then to a
    multiple of 64 (as Hugging Face's conversion: ``resize_token_embeddings(V + 2, 64)``)."""
    needed = max(rows, len(tokenizer))
    return math.ceil(needed / VOCABULARY_MULTIPLE) * VOCABULARY_MULTIPLE


def image_options(tower_dir: Path) -> dict:
    path = tower_dir / "preprocessor_config.json"
    if not path.is_file():
        raise ValueError(f"{tower_dir}: no preprocessor_config.json (the CLIP tower's image preprocessing)")
    config = json.loads(path.read_text())
    return {k: config[k] for k in IMAGE_OPTIONS if k in config}


def converted_processor(original: Original, tokenizer, tower_dir: Path, patch_size: int, num_queries: int | None):
    """LlavaProcessor (pad to square when the release does), LlavaNextProcessor (the anyres pinpoints) or,
    for MQT-LLaVA, a LlavaProcessor writing ``num_queries`` placeholders per image."""
    options = image_options(tower_dir)
    text = {
        "tokenizer": tokenizer,
        "patch_size": patch_size,
        "vision_feature_select_strategy": original.strategy,
        "num_additional_image_tokens": 1,  # CLIP's CLS token
        "image_token": IMAGE_TOKEN,
    }
    if original.kind == "llava_next":
        images = LlavaNextImageProcessor(image_grid_pinpoints=original.pinpoints, **options)
        return LlavaNextProcessor(image_processor=images, **text)
    processor = LlavaProcessor(image_processor=LlavaImageProcessor(do_pad=original.pad, **options), **text)
    return processor_for_queries(processor, num_queries) if original.kind == "mqt_llava" else processor
