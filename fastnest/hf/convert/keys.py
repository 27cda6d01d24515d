"""Original LLaVA weight names (``LlavaLlamaForCausalLM``) and a CLIP directory's, as Hugging Face's.

The original model is a ``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers``, ``model.norm``,
``lm_head``) with ``model.mm_projector`` (an ``nn.Sequential``: ``0`` linear, ``1`` GELU, ``2`` linear),
``model.vision_tower.vision_tower`` (a ``CLIPVisionModel``), ``model.image_newline`` (LLaVA-NeXT) and, in
MQT-LLaVA, ``model.query_abstractor`` (already the name ``mqt_llava`` uses). A name no rule covers is kept as
it is, so the check against the target's names reports it as unexpected.
"""

from __future__ import annotations

from collections.abc import Iterable

ORIGINAL_TOWER = "model.vision_tower.vision_tower."
NEWLINE = "model.image_newline"
# buffers some checkpoints carry, which Hugging Face recomputes: not weights of the target
RECOMPUTED = (".rotary_emb.inv_freq", "embeddings.position_ids")
CLIP_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
RENAMES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.query_abstractor.", "model.query_abstractor."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# rows of the vocabulary: the conversion appends the image and pad tokens' rows
VOCABULARY = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def tower_prefix(target_names: Iterable[str]) -> str:
    """Where the target keeps a ``CLIPVisionModel``'s inner names: transformers 5.0 under ``vision_model.``,
    later releases directly under ``model.vision_tower.`` (read from the target, not assumed)."""
    nested = "model.vision_tower.vision_model."
    return nested if any(n.startswith(nested) for n in target_names) else "model.vision_tower."


def tower_name(name: str, prefix: str) -> str | None:
    """A CLIP checkpoint's name (``CLIPVisionModel``, with or without ``vision_model.``, or ``CLIPModel``) in
    the target; None for what is not the vision tower's weights."""
    if name.startswith(CLIP_NOT_VISION) or name.endswith(RECOMPUTED):
        return None
    return prefix + name.removeprefix("vision_model.")


def checkpoint_name(name: str, prefix: str, newline: bool) -> str | None:
    """An original checkpoint's name in the target (``prefix``: ``tower_prefix``); None for a tensor the target
    does not hold: a recomputed buffer, or ``image_newline`` where the target has none (``newline`` False: the
    release creates it for ``spatial_unpad`` but uses it only for anyres images)."""
    if name.endswith(RECOMPUTED):
        return None
    if name.startswith(ORIGINAL_TOWER):
        return tower_name(name.removeprefix(ORIGINAL_TOWER), prefix)
    if name == NEWLINE:
        return name if newline else None
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name
