"""The prompt an evaluation request becomes: its context with one ``<image>`` tag per image, in a conversation."""

from __future__ import annotations

from ..train.template import IMAGE_TAG, ROLES, SYSTEM_V1

CONVERSATIONS = ("auto", "v1", "processor")


def with_image_tags(context: str, num_images: int) -> str:
    """``context`` holding one ``<image>`` tag per image: its own tags when it has them (as many as images),
    else the tags on a line before it, as lmms-eval's ``llava_hf`` places them."""
    tags = context.count(IMAGE_TAG)
    if tags == num_images:
        return context
    if tags:
        raise ValueError(f"the context holds {tags} {IMAGE_TAG} tags for {num_images} images: {context[:200]!r}")
    return " ".join([IMAGE_TAG] * num_images) + "\n" + context


def user_prompt(processor, context: str, num_images: int, conversation: str = "auto") -> str:
    """The text that asks the model to answer ``context`` (its answer, the continuation, follows it directly).

    ``conversation``: ``"v1"`` is LLaVA's v1 conversation (``SYSTEM USER: ... ASSISTANT:``), which the released
    M3 and MQT models were trained and evaluated with and ``fastnest train`` uses; ``"processor"`` is the
    processor's chat template (Hugging Face checkpoints such as llava-hf carry one); ``"auto"`` takes the
    processor's template when it has one, else v1."""
    if conversation not in CONVERSATIONS:
        raise ValueError(f"conversation must be one of {CONVERSATIONS}, got {conversation!r}")
    template = getattr(processor, "chat_template", None)
    if conversation == "processor" and template is None:
        raise ValueError("conversation='processor' but the processor has no chat_template; use 'v1' or 'auto'")
    text = with_image_tags(context, num_images)
    if conversation == "v1" or template is None:
        return f"{SYSTEM_V1} {ROLES['human']} {text} {ROLES['gpt']}"
    message = {"role": "user", "content": [{"type": "text", "text": text}]}  # tags in the text: kept in place
    return processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
