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

    Returns lists (one entry per row) of ``[len, D]`` embeddings, ``[len]`` labels and ``[len]`` token ids
    (image positions keep the image token id).
    """
    image_id = model.config.image_token_id
    pooled = pooled_image_features(model, pixel_values, scale) if pixel_values is not None else None
    embed = model.get_input_embeddings()
    rows_embeds, rows_labels, rows_ids = [], [], []
    image = 0
    vision = model.config.vision_config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, lab = input_ids[b][keep], labels[b][keep] if labels is not None else None
        embeds, out_labels, out_ids = [], [], []
        t = 0
        while t < len(ids):
            if ids[t] == image_id:
                embeds.append(pooled[image])
                out_labels += [-100] * scale
                out_ids += [image_id] * scale
                image += 1
                t += tokens_per_image
            else:
                embeds.append(embed(ids[t : t + 1]))
                out_labels.append(int(lab[t]) if lab is not None else -100)
                out_ids.append(int(ids[t]))
                t += 1
        rows_embeds.append(torch.cat(embeds))
        rows_labels.append(torch.tensor(out_labels))
        rows_ids.append(torch.tensor(out_ids))
    return rows_embeds, rows_labels, rows_ids


def padded_lm_loss(model, embeds: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Rows of embeddings padded on the right, one full forward, full fp32 logits, token-mean next-token CE."""
    width = max(len(e) for e in embeds)
    batch = torch.zeros(len(embeds), width, embeds[0].shape[-1], dtype=embeds[0].dtype)
    mask = torch.zeros(len(embeds), width, dtype=torch.long)
    lab = torch.full((len(embeds), width), -100)
    for b, (e, y) in enumerate(zip(embeds, labels)):
        batch[b, : len(e)], mask[b, : len(e)], lab[b, : len(e)] = e, 1, y
    hidden = model.model.language_model(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).float()
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
