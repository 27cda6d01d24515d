"""transformers' ``ModelTesterMixin`` over a tiny Llava of fastnest's own; run only by ``test_hf_peer_suite.py`` in
a child pytest (the name is not ``test_*``: the project's own run does not collect it).

The child finds the sdist's tests as package ``hf_sdist_tests`` on ``PYTHONPATH``. With
``FASTNEST_PEER_PATCHED=1`` every ``LlavaForConditionalGeneration`` is patched right after construction, so each
of the mixin's tests (and ``from_pretrained``) sees a patched model exactly where it would see a plain one.
"""

from __future__ import annotations

import functools
import os
import unittest

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel

try:
    from hf_sdist_tests import test_modeling_common as common
except ImportError as err:  # run outside the harness
    pytest.skip(f"the transformers sdist tests are not on the path ({err})", allow_module_level=True)

# Scales that fit the 4x4 grid (the default scales need a 24x24 one).
SCALES = (1, 4, 16)
PATCHED = os.environ.get("FASTNEST_PEER_PATCHED") == "1"


def _patch_after_init() -> None:
    import fastnest

    plain_init = LlavaForConditionalGeneration.__init__

    @functools.wraps(plain_init)
    def init(self, config, *args, **kwargs) -> None:
        plain_init(self, config, *args, **kwargs)
        fastnest.patch_llava(self, scales=SCALES)

    LlavaForConditionalGeneration.__init__ = init


if PATCHED:
    _patch_after_init()


class TinyLlavaTester:
    """A CLIP-style vision tower on a 4x4 patch grid (16 placeholders per image) and a two-layer Llama.

    Rows look like LlavaProcessor's output for ``"<bos>USER: <image>\\nWhat is this? ASSISTANT:"``: BOS, two text
    tokens, the ``<image>`` expanded to its 16 placeholders, four more text tokens; no padding (equal prompts).
    """

    pad_token_id, bos_token_id, eos_token_id, image_token_id = 0, 1, 2, 3  # text ids start after these
    prefix, suffix = 2, 4

    def __init__(self, parent: unittest.TestCase) -> None:
        self.parent = parent
        self.batch_size = 3
        self.is_training = True
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        self.image_size = self.vision_config["image_size"]
        self.patch_size = self.vision_config["patch_size"]
        self.num_channels = self.vision_config["num_channels"]
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2  # 'default' strategy: CLS dropped
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.seq_length = 1 + self.prefix + self.num_image_tokens + self.suffix
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> LlavaConfig:
        return LlavaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_index=self.image_token_id,
            image_seq_length=self.num_image_tokens,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[LlavaConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        first_text = self.image_token_id + 1
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - first_text) + first_text
        input_ids[:, 0] = self.bos_token_id
        input_ids[:, 1 + self.prefix : 1 + self.prefix + self.num_image_tokens] = self.image_token_id
        pixel_values = common.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }
        return config, inputs


# The sdist's tests/generation is absent (stubbed); the mixin demands that a generate-capable model's test
# class inherit GenerationTesterMixin, whichever it is.
GenerationTesterMixin = getattr(common, "GenerationTesterMixin", object)


class LlavaPeerModelTest(common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)
    _is_composite = True  # vision + text sub-configs, as transformers' own Llava test declares

    def setUp(self) -> None:
        self.model_tester = TinyLlavaTester(self)

    def test_harness_patches(self) -> None:
        """The suite runs what it claims: patched models in the patched run, plain ones otherwise."""
        from fastnest.hf import is_patched

        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        self.assertEqual(is_patched(LlavaForConditionalGeneration(config)), PATCHED)
