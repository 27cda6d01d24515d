"""Tiny checkpoints in the original LLaVA format and a plain re-statement of the original forward.

The original model (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``, as forked by mu-cai/matryoshka-mm and
gordonhu608/MQT-LLaVA) is a ``LlamaForCausalLM`` whose ``model`` also holds ``vision_tower.vision_tower`` (a
``CLIPVisionModel``), ``mm_projector`` (``nn.Sequential(Linear, GELU, Linear)``), ``image_newline`` (NeXT) or
``query_abstractor`` (MQT's ``Resampler``). ``OriginalLlava`` builds exactly that module tree, so its
``state_dict`` has the original names. ``original_logits`` is the original forward written out, without any
fastnest or conversion code: the tower's layer ``mm_vision_select_layer`` without CLS, the projector (M3: then
``avg_pool2d`` to ``s`` tokens; MQT: the released connector at m queries), LLaVA-NeXT's anyres arrangement,
the image spliced at the position of id -200 (``IMAGE_TOKEN_INDEX``), the language model, fp32 logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tools.mqt_reference import released_connector

IMAGE_TOKEN_INDEX = -200
TOWER = "model.vision_tower.vision_tower."
WORDS = "user assistant describe the picture what colour is it a red green blue dot square on left right".split()


class Resampler(nn.Module):
    """The MQT release's connector parameters under its names (``Resampler``: 16 heads, LayerNorms eps 1e-6)."""

    def __init__(self, num_queries: int, vision_dim: int, out_dim: int, heads: int = 16) -> None:
        super().__init__()
        self.query = nn.Parameter(0.02 * torch.randn(num_queries, vision_dim))
        self.pos_embed = nn.Parameter(torch.randn(num_queries, vision_dim))
        self.attn = nn.MultiheadAttention(vision_dim, heads)
        self.ln_q, self.ln_k, self.ln_v = (nn.LayerNorm(vision_dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(vision_dim, out_dim))


class CLIPVisionTower(nn.Module):
    """The release's tower wrapper: its ``CLIPVisionModel`` is ``.vision_tower``."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)


class OriginalLlava(nn.Module):
    """``LlavaLlamaForCausalLM``'s module tree: ``kind`` "llava" (M3 LLaVA-1.5), "llava_next" or "mqt_llava"."""

    def __init__(self, text: LlamaConfig, vision: CLIPVisionConfig, kind: str, num_queries: int = 16) -> None:
        super().__init__()
        llama = LlamaForCausalLM(text)
        self.model, self.lm_head = llama.model, llama.lm_head
        self.kind, self.vision = kind, vision
        self.model.vision_tower = CLIPVisionTower(vision)
        if kind == "mqt_llava":
            self.model.query_abstractor = Resampler(num_queries, vision.hidden_size, text.hidden_size)
        else:
            self.model.mm_projector = nn.Sequential(
                nn.Linear(vision.hidden_size, text.hidden_size),
                nn.GELU(),
                nn.Linear(text.hidden_size, text.hidden_size),
            )
        if kind == "llava_next":
            self.model.image_newline = nn.Parameter(torch.randn(text.hidden_size) / text.hidden_size**0.5)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as the release saves it: its transformers (4.x) nests CLIP under ``vision_model.``."""
        out = {}
        for name, tensor in self.state_dict().items():
            if name.startswith(TOWER) and not name.startswith(TOWER + "vision_model."):
                name = TOWER + "vision_model." + name.removeprefix(TOWER)
            out[name] = tensor.contiguous()
        return out


def tiny_configs(*, vocab: int, image_size: int = 24, patch_size: int = 4, vision_hidden: int = 32):
    """A small Llama (2 layers, grouped-query attention) and CLIP tower (2 layers; 6x6 patches by default)."""
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        rope_theta=10000.0,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=vision_hidden,
    )
    return text, vision


def word_tokenizer(size: int | None = None) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer without an image token: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``WORDS`` (and
    made-up words up to ``size`` entries, as a real tokenizer fills its vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ("<unk>", "<s>", "</s>", *WORDS)
    words += tuple(f"w{i}" for i in range(max(0, (size or 0) - len(words))))
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def original_config(model: OriginalLlava, vision_tower: str, **fields) -> dict:
    """config.json as the release writes it: the Llama config plus LLaVA's fields (``fields`` override)."""
    config = model.model.config.to_dict()
    config.pop("dtype", None)
    config.pop("rope_parameters", None)
    config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        rope_theta=10000.0,
        rope_scaling=None,
        torch_dtype="float32",
        mm_vision_tower=vision_tower,
        mm_hidden_size=model.vision.hidden_size,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        tune_mm_mlp_adapter=False,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
    )
    config.update(fields)
    return config


def write_original(
    model: OriginalLlava,
    directory: Path,
    config: dict,
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    tower: bool = True,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Save ``model`` in the original layout: ``shards`` files (an index when more than one), ``.safetensors``
    or ``.bin``; ``tower=False`` leaves the vision tower out (as when it was not saved); ``extra`` tensors are
    added. Writes config.json and the tokenizer. Returns the saved state dict."""
    state = {k: v for k, v in model.original_state_dict().items() if tower or not k.startswith(TOWER)}
    state.update(extra or {})
    names = list(state)
    write_shards(
        directory,
        [names[i * len(names) // shards : (i + 1) * len(names) // shards] for i in range(shards)],
        state.__getitem__,
        fmt,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    word_tokenizer().save_pretrained(directory)
    return state


def write_shards(directory: Path, shards: list[list[str]], tensor, fmt: str = "safetensors") -> None:
    """One file per list of names (``tensor(name)`` makes each, a shard at a time), and an index for several."""
    directory.mkdir(parents=True, exist_ok=True)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"{stem}.{suffix}" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}"
        tensors = {k: tensor(k) for k in part}
        if fmt == "safetensors":
            save_file(tensors, directory / file, metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / file)
        weight_map.update(dict.fromkeys(part, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))


def write_clip(tower: CLIPVisionModel, directory: Path) -> Path:
    """A CLIP directory: the tower's weights and config, and CLIP's preprocessing for its image size."""
    tower.save_pretrained(directory)
    return write_clip_config(tower.config, directory)


def write_clip_config(vision: CLIPVisionConfig, directory: Path) -> Path:
    """A CLIP directory without weights: the config and CLIP's preprocessing for its image size."""
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 5.0
        from transformers import CLIPImageProcessor
    vision.save_pretrained(directory)
    size = vision.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )
    return directory


def original_ids(tokenizer, before: str, after: str) -> torch.Tensor:
    """``tokenizer_image_token``: the text around the image, the image as id -200: ``[1, length]``."""
    return torch.tensor([tokenizer(before)["input_ids"] + [IMAGE_TOKEN_INDEX] + tokenizer(after)["input_ids"]])


@torch.no_grad()
def original_logits(
    model: OriginalLlava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    select_layer: int = -2,
    scale: int | None = None,
    num_tokens: int | None = None,
    image_size: tuple[int, int] | None = None,
    pinpoints: list[list[int]] | None = None,
) -> torch.Tensor:
    """The original forward of one row (``[1, length]`` ids with one -200) and its image: fp32 logits.

    LLaVA-1.5: ``pixel_values`` ``[1, 3, H, W]``, ``scale`` pooled tokens (None: all). MQT: ``num_tokens`` m.
    LLaVA-NeXT: ``pixel_values`` ``[crops, 3, H, W]`` (base image first), ``image_size`` and ``pinpoints`` in the
    release's (width, height) order; each crop pooled to ``scale`` on its own before the arrangement.
    """
    out = model.model.vision_tower.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[select_layer][:, 1:]  # mm_vision_select_feature 'patch'
    if model.kind == "mqt_llava":
        image = released_connector(model.model.query_abstractor, feats, num_tokens)[0]
    else:
        feats = model.model.mm_projector(feats)
        if scale is not None:
            feats = _pooled(feats, scale)
        image = _anyres(model, feats, image_size, pinpoints) if model.kind == "llava_next" else feats[0]
    ids = input_ids[0]
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    embed = model.model.embed_tokens
    embeds = torch.cat([embed(ids[:at]), image.to(embed.weight.dtype), embed(ids[at + 1 :])])[None]
    hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return model.lm_head(hidden).float()


def _pooled(feats: torch.Tensor, scale: int) -> torch.Tensor:
    """``matryoshka_vis_token_process``: each map viewed as a square grid, ``avg_pool2d`` kernel = stride."""
    n, tokens, dim = feats.shape
    side = math.isqrt(tokens)
    kernel = int(math.sqrt(tokens / scale))
    grid = feats.view(n, side, side, dim).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, kernel_size=kernel, stride=kernel).permute(0, 2, 3, 1).reshape(n, -1, dim)


def select_best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """``mm_utils.select_best_resolution``: sizes and pinpoints as (width, height); the first wins a tie."""
    width, height = size
    best, most, least_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > most or (effective == most and waste < least_waste):
            best, most, least_waste = (w, h), effective, waste
    return best


def _anyres(model: OriginalLlava, feats: torch.Tensor, size: tuple[int, int], pinpoints) -> torch.Tensor:
    """The release's ``spatial_unpad`` arrangement of one image's crops: the base crop's tokens, then the grid
    crops stitched, unpadded (``unpad_image``, truncating), a newline after each row."""
    base, crops = feats[0], feats[1:]
    side = math.isqrt(base.shape[0])
    w, h = select_best_resolution(size, pinpoints)
    across, down = w // model.vision.image_size, h // model.vision.image_size
    grid = crops.view(down, across, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = _unpad(grid, size)
    newline = model.model.image_newline[:, None, None].expand(*grid.shape[:-1], 1)
    grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat([base, grid])


def _unpad(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``unpad_image`` of the release: ``size`` (width, height); the kept extent is truncated with ``int``."""
    width, height = size
    rows, cols = tensor.shape[1:]
    if width / height > cols / rows:
        kept = int(height * (cols / width))
        pad = (rows - kept) // 2
        return tensor[:, pad : rows - pad, :]
    kept = int(width * (rows / height))
    pad = (cols - kept) // 2
    return tensor[:, :, pad : cols - pad]
