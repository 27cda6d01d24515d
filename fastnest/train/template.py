"""LLaVA's v1 conversation template, and labels on the assistant turns only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..packing import IGNORE_INDEX

IMAGE_TAG = "<image>"
SYSTEM_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = {"human": "USER:", "gpt": "ASSISTANT:"}


class BadSample(ValueError):
    """A row that cannot be trained on: the message says why, ``kind`` names the class of problem."""

    def __init__(self, message: str, kind: str = "malformed row") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Encoded:
    input_ids: torch.Tensor  # int64 [L]
    labels: torch.Tensor  # int64 [L], IGNORE_INDEX outside assistant turns
    num_images: int


def check_conversation(conversations: object) -> list[dict]:
    """Validate a ``"conversations"`` list: alternating human/gpt turns, starting with human."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(f'"conversations" must be a non-empty list of turns, got {type(conversations).__name__}')
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample(f'turn {i} must be an object with a string "value", got {turn!r:.80}')
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise BadSample(f'turn {i} must be from "{expected}" (turns alternate human/gpt), got {turn.get("from")!r}')
        if expected == "gpt" and IMAGE_TAG in turn["value"]:
            raise BadSample(
                f"turn {i} (gpt) holds {IMAGE_TAG}: images go in human turns", "image tag in an assistant turn"
            )
    if len(conversations) < 2:
        raise BadSample('no "gpt" turn: a row needs at least one answer to learn or score', "no assistant turn")
    return conversations


def count_image_tags(conversations: list[dict]) -> int:
    return sum(turn["value"].count(IMAGE_TAG) for turn in conversations)


def encode_v1(
    conversations: list[dict],
    tokenizer,
    *,
    image_token_id: int,
    tokens_per_image: int | Sequence[int],
    system: str = SYSTEM_V1,
) -> Encoded:
    """``system USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...`` (LLaVA v1), tokenised piecewise.

    Each ``<image>`` becomes ``tokens_per_image`` placeholder ids (what ``LlavaProcessor`` produces; a sequence:
    each image's own count, in order, as ``LlavaNextProcessor`` counts them); labels
    cover each assistant answer and its end-of-sequence token, nothing else.
    """
    check_conversation(conversations)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: the v1 template ends every answer with it")
    ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE_INDEX] * len(ids)

    def text(s: str, learn: bool) -> None:
        if not s.strip():
            return
        piece = tokenizer(s, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    num_images = 0
    prompt = system
    for turn in conversations:
        if turn["from"] == "human":
            parts = turn["value"].split(IMAGE_TAG)
            prompt += f" {ROLES['human']} {parts[0]}"
            for part in parts[1:]:
                text(prompt, learn=False)
                count = tokens_per_image if isinstance(tokens_per_image, int) else tokens_per_image[num_images]
                ids.extend([image_token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                num_images += 1
                prompt = part
            prompt += f" {ROLES['gpt']}"
        else:
            text(prompt, learn=False)
            text(" " + turn["value"], learn=True)
            ids.append(eos)
            labels.append(eos)
            prompt = ""
    return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), num_images)
