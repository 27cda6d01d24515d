"""The built-in run's tokenizer (word level, built in code) and LLaVA (or anyres LLaVA-NeXT) processor for 48x48
images."""

from __future__ import annotations

from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast

try:  # the PIL-backed classes: no torchvision needed
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
except ImportError:  # older transformers
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

from . import data_synthetic
from .template import ROLES, SYSTEM_V1

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 2  # 48x48 pixels -> a 24x24 patch grid
# The built-in LLaVA-NeXT's grids, (height, width) as Hugging Face reads them: 1x2, 2x1 and 2x2 crops of 48 pixels
NEXT_PINPOINTS = [[48, 96], [96, 48], [96, 96]]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer: ids 0-3 are pad/unk/bos/eos, the image token is the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab[IMAGE_TOKEN] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """The word tokenizer over the synthetic dataset's words and the v1 template's."""
    return word_tokenizer(SYSTEM_V1.split() + list(ROLES.values()) + data_synthetic.vocabulary())


def synthetic_processor() -> LlavaProcessor:
    """The synthetic tokenizer with a CLIP image processor."""
    size = data_synthetic.IMAGE_SIZE
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=synthetic_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def synthetic_next_processor() -> LlavaNextProcessor:
    """The synthetic tokenizer with an anyres image processor: 48-pixel crops on ``NEXT_PINPOINTS`` grids (a
    square synthetic image takes the first, 1x2: base crop + 2 grid crops)."""
    size = data_synthetic.IMAGE_SIZE
    images = LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    # as in the llava-hf checkpoints: the CLS token counted, then dropped by the "default" strategy
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=synthetic_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
