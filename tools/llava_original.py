"""Original-LLaVA (``llava-torch``) test models, batches and a plain re-statement of the released M3 loop.

Runs in the environment of the original code's own versions (tools/llava_original_env.py): transformers 4.36,
``llava`` importable. Nothing here uses fastnest.

The released loop (mu-cai/matryoshka-mm, llava/model/language_model/llava_llama.py): for each scale, the
original ``prepare_inputs_labels_for_multimodal`` with ``encode_images``'s output (tower, then projector)
average-pooled to ``s`` tokens per image (``matryoshka_vis_token_process``: a ``grid x grid`` view,
``F.avg_pool2d`` with kernel = stride = ``grid / sqrt(s)``, row-major), then the full language-model forward
with fp32 logits and the token-mean next-token cross-entropy; the loss is the plain mean over scales.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_TOKEN_INDEX = -200  # llava.constants
IMG = "img"
PAD_ID = 0  # the collator pads with the tokenizer's pad (LLaVA-1.5 sets it to unk, id 0)


def tiny_original_llava(
    tower_dir: Path,
    *,
    family: str = "llama",
    grid: int = 24,
    patch: int = 2,
    vision_hidden: int = 32,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 300,
    seed: int = 0,
    **config,
):
    """An original-format LLaVA with random weights: a config-built two-layer CLIP tower saved to ``tower_dir``
    (the original ``CLIPVisionTower`` loads from a directory) and loaded as train.py's
    ``initialize_vision_modules`` does (frozen), the ``mlp2x_gelu`` projector and a small Llama (or Mistral,
    ``family="mistral"``). ``config``: more config options (``tokenizer_model_max_length``, ``sliding_window``,
    ``attn_implementation``, ...)."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    size = grid * patch
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=patch,
    )
    CLIPVisionModel(vision).save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        tower_dir
    )
    config_cls, model_cls = {
        "llama": (LlavaConfig, LlavaLlamaForCausalLM),
        "mistral": (LlavaMistralConfig, LlavaMistralForCausalLM),
    }[family]
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        mm_vision_tower=str(tower_dir),
        mm_hidden_size=vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
        **config,
    )
    model = model_cls(cfg)
    model.get_model().get_vision_tower().load_model()
    return model


def original_batch(rows: list[list], *, vocab: int, image_size: int, seed: int = 0) -> dict:
    """A batch as LLaVA's ``DataCollatorForSupervisedDataset`` builds it.

    ``rows``: per row, segments: an int ``n`` (n random text tokens, never the pad id) or ``IMG`` (one
    ``IMAGE_TOKEN_INDEX`` marker); the last text segment is the labelled answer. Right padding with the pad
    id, ``attention_mask = input_ids.ne(pad)``, labels -100 elsewhere; ``images``: one per marker and one blank
    (zeros) per text-only row, as LazySupervisedDataset gives them.
    """
    g = torch.Generator().manual_seed(seed)
    ids, labels, images = [], [], []
    for segments in rows:
        row, lab = [], []
        last_text = max(i for i, s in enumerate(segments) if s != IMG)
        for i, seg in enumerate(segments):
            if seg == IMG:
                row.append(torch.tensor([IMAGE_TOKEN_INDEX]))
                lab.append(torch.tensor([-100]))
                images.append(torch.randn(3, image_size, image_size, generator=g))
            else:
                text = torch.randint(3, vocab, (seg,), generator=g)
                row.append(text)
                lab.append(text.clone() if i == last_text else torch.full((seg,), -100))
        if IMG not in segments:
            images.append(torch.zeros(3, image_size, image_size))
        ids.append(torch.cat(row))
        labels.append(torch.cat(lab))
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=PAD_ID)
    return {
        "input_ids": input_ids,
        "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100),
        "attention_mask": input_ids.ne(PAD_ID),
        "images": torch.stack(images),
    }


def pool(features: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, grid², D] -> [N, scale, D]``: the fork's ``matryoshka_vis_token_process``."""
    n, tokens, d = features.shape
    grid = math.isqrt(tokens)
    kernel = int(math.sqrt(tokens / scale))
    as_grid = features.view(n, grid, grid, d).permute(0, 3, 1, 2)
    return F.avg_pool2d(as_grid, kernel_size=kernel, stride=kernel).permute(0, 2, 3, 1).reshape(n, -1, d)


@contextlib.contextmanager
def encoding_at(model, scale: int, train_tower: bool = False) -> Iterator[None]:
    """``model.encode_images`` (tower, projector) pooled to ``scale`` meanwhile. ``train_tower``: the tower's
    model without the ``no_grad`` of its forward (the released fork keeps it; the paper trains the tower)."""

    def encode(images):
        tower = model.get_vision_tower()
        if train_tower:
            out = tower.vision_tower(images.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
            feats = tower.feature_select(out).to(images.dtype)
        else:
            feats = tower(images)
        return pool(model.get_model().mm_projector(feats), scale)

    model.encode_images = encode
    try:
        yield
    finally:
        del model.encode_images


def scale_loss(model, batch: dict, scale: int, train_tower: bool = False) -> torch.Tensor:
    """One scale of the released loop: the original input preparation at ``scale``, the full forward, CE."""
    with encoding_at(model, scale, train_tower):
        _, position_ids, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"]
        )
    # the language model's own forward (LlamaForCausalLM / MistralForCausalLM): fp32 logits, token-mean CE
    out = super(type(model), model).forward(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False
    )
    return out.loss


def released_m3_loss(model, batch: dict, scales, train_tower: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The released training objective: ``(mean over scales, per-scale losses)``."""
    per_scale = torch.stack([scale_loss(model, batch, s, train_tower) for s in scales])
    return per_scale.mean(), per_scale


@torch.no_grad()
def reference_greedy(model, input_ids: torch.Tensor, images: torch.Tensor, scale: int, steps: int) -> list[int]:
    """Greedy decoding of one row at ``scale``, recomputing the whole sequence each step (no cache)."""
    with encoding_at(model, scale):
        embeds = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, images)[4][0]
    tokens = []
    for _ in range(steps):
        hidden = model.get_model()(inputs_embeds=embeds[None], use_cache=False).last_hidden_state
        tokens.append(int(model.lm_head(hidden[0, -1]).argmax()))
        embeds = torch.cat([embeds, model.get_model().embed_tokens(torch.tensor(tokens[-1:]))])
    return tokens
