"""Processor-style synthetic batches: each image is grid*grid placeholder tokens, rows padded either side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMG = "img"
SYSTEM_PROMPT = 35  # tokens before the image in LLaVA-1.5's template


def mixed_rows(batch_size: int = 4, seed: int = 0) -> list[list]:
    """The step benchmark's rows (segments as ``make_batch`` takes them): 40-400 text tokens each, a 35-token
    system prompt, the image, a question, then the answer (the last half of the post-image text)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        text = int(torch.randint(40, 401, (1,), generator=g))
        after = text - SYSTEM_PROMPT if text > SYSTEM_PROMPT + 2 else 2
        question = after // 2
        rows.append([SYSTEM_PROMPT, IMG, question, after - question])
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    labels: torch.Tensor

    def inputs(self, labels: bool = True) -> dict:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        if labels:
            out["labels"] = self.labels
        return out


def make_batch(
    model,
    rows: list[list],
    padding_side: str = "right",
    seed: int = 0,
    answer_only: bool = True,
    tokens_per_image: int | None = None,
) -> Batch:
    """``rows``: per row, a list of segments: an int ``n`` (n random text tokens) or ``IMG`` (one image of
    ``tokens_per_image`` placeholders; default: the tower's grid², as LLaVA's processor).

    Labels: the last text segment of each row (the "answer"), or every text token with ``answer_only=False``.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tpi = tokens_per_image or (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    image_id = cfg.image_token_id
    ids, labs, n_images = [], [], 0
    for segments in rows:
        row_ids, row_labels = [], []
        last_text = max(i for i, s in enumerate(segments) if s != IMG)
        for i, seg in enumerate(segments):
            if seg == IMG:
                row_ids.append(torch.full((tpi,), image_id))
                row_labels.append(torch.full((tpi,), -100))
                n_images += 1
            else:
                text = torch.randint(1, image_id, (seg,), generator=g)
                row_ids.append(text)
                row_labels.append(text.clone() if (i == last_text or not answer_only) else torch.full((seg,), -100))
        ids.append(torch.cat(row_ids))
        labs.append(torch.cat(row_labels))
    input_ids, labels, mask = _padded(ids, labs, padding_side)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(n_images, 3, size, size, generator=g) if n_images else None
    return Batch(input_ids, mask, pixel_values, labels)


def make_anyres_batch(model, rows: list[list], sizes: list[tuple[int, int]], padding_side="right", seed=0) -> dict:
    """A LLaVA-NeXT processor-style batch: ``rows`` as in :func:`make_batch`, each IMG the next image of
    ``sizes`` ((height, width)) as its processor-count run of placeholders; labels on each row's last text
    segment. ``pixel_values [images, max crops, 3, H, W]`` and ``image_sizes``: images with fewer crops than
    the most carry padding crops of large random values, which must never be read."""
    from tools.next_reference import anyres_grid_shape, placeholder_count, released_pinpoints

    g = torch.Generator().manual_seed(seed)
    image_id, next_size = model.config.image_token_id, iter(sizes)
    ids, labs = [], []
    for segments in rows:
        row_ids, row_labels = [], []
        last_text = max(i for i, s in enumerate(segments) if s != IMG)
        for i, seg in enumerate(segments):
            if seg == IMG:
                n = placeholder_count(model, next(next_size))
                row_ids.append(torch.full((n,), image_id))
                row_labels.append(torch.full((n,), -100))
            else:
                text = torch.randint(1, image_id, (seg,), generator=g)
                row_ids.append(text)
                row_labels.append(text.clone() if i == last_text else torch.full((seg,), -100))
        ids.append(torch.cat(row_ids))
        labs.append(torch.cat(row_labels))
    input_ids, labels, mask = _padded(ids, labs, padding_side)
    crop = model.config.vision_config.image_size
    crops = [1 + a * d for a, d in (anyres_grid_shape((w, h), released_pinpoints(model), crop) for h, w in sizes)]
    pixel_values = torch.randn(len(sizes), max(crops), 3, crop, crop, generator=g)
    for i, n in enumerate(crops):
        pixel_values[i, n:] *= 1e4
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return batch | {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}


def _padded(ids: list, labs: list, padding_side: str):
    """Rows of ids and labels padded to one width (id 0, label -100) on ``padding_side``, with their mask."""
    width = max(len(r) for r in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    labels = torch.full((len(ids), width), -100)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(ids, labs)):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        input_ids[b, span], labels[b, span], mask[b, span] = r, lab, 1
    return input_ids, labels, mask
