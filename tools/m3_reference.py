"""A plain, readable re-statement of the released M3 algorithm (mu-cai/matryoshka-mm, llava_llama.py).

Written against the UNPATCHED Hugging Face model and without any fastnest code, so tests can compare
fastnest to it. Training: for every scale, run the vision tower and the projector again, average-pool the
projector output on the grid (kernel = stride = grid / sqrt(scale)), splice the pooled tokens into each row
in place of that image's placeholders, right-pad the batch, run the full language model, take full fp32
logits and the token-mean next-token cross-entropy; the loss is the plain mean over scales. (Unlike the
release, the vision tower is not under no_grad: fastnest trains it when it requires grad.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pooled_image_features(model, pixel_values: torch.Tensor, scale: int) -> torch.Tensor:
    """Vision tower + projector (Hugging Face code), then avg_pool2d: ``[num_images, scale, D]``."""
    feats = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    n, tokens, d = feats.shape
    grid = math.isqrt(tokens)
    kernel = grid // math.isqrt(scale)
    as_grid = feats.transpose(1, 2).reshape(n, d, grid, grid)
    return F.avg_pool2d(as_grid, kernel_size=kernel, stride=kernel).flatten(2).transpose(1, 2)


def scaled_rows(model, input_ids, attention_mask, pixel_values, labels, scale):
    """Each row's valid tokens as embeddings, its images replaced by ``scale`` pooled tokens each.

    As the release does it: the row's text embedded in one call, then cut at the images and spliced with the
    pooled features. Returns lists (one entry per row) of ``[len, D]`` embeddings, ``[len]`` labels and
    ``[len]`` token ids (image positions keep the image token id).
    """
    image_id = model.config.image_token_id
    pooled = pooled_image_features(model, pixel_values, scale) if pixel_values is not None else None
    embed = model.get_input_embeddings()
    vision = model.config.vision_config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2
    rows_embeds, rows_labels, rows_ids = [], [], []
    image = 0
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep]
        lab = labels[b][keep] if labels is not None else torch.full_like(ids, -100)
        text = embed(ids)
        starts = (ids == image_id).nonzero().squeeze(1)[::tokens_per_image].tolist()  # each image's first token
        embeds, out_labels, out_ids = [], [], []
        t = 0
        for start in [*starts, len(ids)]:
            embeds.append(text[t:start])
            out_labels.append(lab[t:start])
            out_ids.append(ids[t:start])
            if start == len(ids):
                break
            embeds.append(pooled[image])
            out_labels.append(torch.full((scale,), -100))
            out_ids.append(torch.full((scale,), image_id))
            image += 1
            t = start + tokens_per_image
        rows_embeds.append(torch.cat(embeds))
        rows_labels.append(torch.cat(out_labels))
        rows_ids.append(torch.cat(out_ids))
    return rows_embeds, rows_labels, rows_ids


def padded_logits(model, embeds: list[torch.Tensor]) -> torch.Tensor:
    """Rows of embeddings padded on the right, one full language-model forward, full fp32 logits
    ``[rows, width, vocab]``."""
    width = max(len(e) for e in embeds)
    batch = torch.zeros(len(embeds), width, embeds[0].shape[-1], dtype=embeds[0].dtype)
    mask = torch.zeros(len(embeds), width, dtype=torch.long)
    for b, e in enumerate(embeds):
        batch[b, : len(e)], mask[b, : len(e)] = e, 1
    hidden = model.model.language_model(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
    return model.lm_head(hidden).float()


def padded_labels(labels: list[torch.Tensor]) -> torch.Tensor:
    """Rows of labels padded on the right with -100 (ignored), ``[rows, width]``."""
    out = torch.full((len(labels), max(len(y) for y in labels)), -100)
    for b, y in enumerate(labels):
        out[b, : len(y)] = y
    return out


def padded_lm_loss(model, embeds: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Rows of embeddings padded on the right, one full forward, full fp32 logits, token-mean next-token CE."""
    logits, lab = padded_logits(model, embeds), padded_labels(labels)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1))


def released_m3_loss(model, input_ids, attention_mask, pixel_values, labels, scales):
    """The released training objective: ``(mean over scales, per-scale losses)``; full fp32 logits per scale."""
    losses = []
    for scale in scales:
        embeds, labs, _ = scaled_rows(model, input_ids, attention_mask, pixel_values, labels, scale)
        losses.append(padded_lm_loss(model, embeds, labs))
    per_scale = torch.stack(losses)
    return per_scale.mean(), per_scale


@torch.no_grad()
def reference_greedy(model, embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy decode of one unpadded row from its embeddings, recomputing the whole sequence each step."""
    out = []
    for _ in range(steps):
        hidden = model.model.language_model(inputs_embeds=embeds[None], use_cache=False).last_hidden_state
        token = int(model.lm_head(hidden[0, -1]).argmax())
        out.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
    return out
