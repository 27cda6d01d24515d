"""The built-in run's tokenizer (word level, built in code) and LLaVA processor for 48x48 images."""

from __future__ import annotations

from transformers import LlavaProcessor, PreTrainedTokenizerFast

try:  # the PIL-backed class: no torchvision needed
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # older transformers
    from transformers import CLIPImageProcessor

from . import data_synthetic
from .template import ROLES, SYSTEM_V1

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 2  # 48x48 pixels -> a 24x24 patch grid


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


def synthetic_processor() -> LlavaProcessor:
    """Tokenizer over the synthetic dataset's words and the v1 template's, with a CLIP image processor."""
    words = SYSTEM_V1.split() + list(ROLES.values()) + data_synthetic.vocabulary()
    size = data_synthetic.IMAGE_SIZE
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=word_tokenizer(words),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
