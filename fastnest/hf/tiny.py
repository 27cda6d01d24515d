"""Small, randomly initialised LLaVA models (CLIP-style tower + Llama) for tests, benchmarks and demos."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


def tiny_configs(
    *,
    grid: int = 24,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    rope_theta: float = 10000.0,
    vocab: int = 512,
) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The tiny models' CLIP-style tower (``grid x grid`` patches) and Llama configs; id 0 is padding."""
    vision = CLIPVisionConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 4 * hidden,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=0,
    )
    return vision, text


def tiny_llava(
    *,
    vocab: int = 512,
    image_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    **sizes,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: ``grid x grid`` patches, mlp2x_gelu projector, Llama text model (``sizes``:
    :func:`tiny_configs`' options).

    The image placeholder token defaults to the last vocabulary id; id 0 is padding.
    """
    vision, text = tiny_configs(vocab=vocab, **sizes)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config)


def tiny_mqt_llava(
    *,
    num_queries: int = 16,
    query_heads: int = 4,
    query_keys: str = "positional",
    grid: int = 6,
    vocab: int = 384,
    image_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    **sizes,
):
    """A small MQT-LLaVA (``fastnest.hf.MQTLlavaForConditionalGeneration``): the tiny LLaVA's tower and Llama
    with a query transformer of ``num_queries`` queries in place of the projector; the image placeholder
    token defaults to the last vocabulary id."""
    from .mqt_model import MQTLlavaConfig, MQTLlavaForConditionalGeneration

    vision, text = tiny_configs(grid=grid, vocab=vocab, **sizes)
    config = MQTLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab - 1 if image_token_id is None else image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        num_queries=num_queries,
        query_heads=query_heads,
        query_keys=query_keys,
    )
    config._attn_implementation = attn_implementation
    return MQTLlavaForConditionalGeneration(config)


def tiny_llava_next(
    *,
    grid: int = 24,
    patch_size: int = 2,
    image_grid_pinpoints: list[list[int]] | None = None,
    vocab: int = 384,
    image_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    **sizes,
):
    """A small LLaVA-NeXT (``LlavaNextForConditionalGeneration``): the tiny LLaVA's tower and Llama, crops of
    ``grid * patch_size`` pixels (48: a 24x24 grid) and by default grids of 1x2, 2x1 and 2x2 crops
    (``image_grid_pinpoints`` as Hugging Face reads them: (height, width) pairs); the image placeholder token
    defaults to the last vocabulary id."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    crop = grid * patch_size
    vision, text = tiny_configs(grid=grid, patch_size=patch_size, vocab=vocab, **sizes)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab - 1 if image_token_id is None else image_token_id,
        image_grid_pinpoints=image_grid_pinpoints or [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return LlavaNextForConditionalGeneration(config)
