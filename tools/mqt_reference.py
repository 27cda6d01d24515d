"""A plain, readable re-statement of the released MQT connector and training objective
(gordonhu608/MQT-LLaVA: ``Resampler`` in ``llava/model/multimodal_projector/builder.py``, one m per forward).

Written without fastnest code: the connector's parameters are read by their released names and the attention
is written out (explicit matmuls and softmax), one m at a time; training at a token count m runs the vision
tower, the connector at m queries, splices the m outputs in place of each image's M placeholders, right-pads
the batch, runs the full language model, takes full fp32 logits and the token-mean next-token cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tools.m3_reference import padded_lm_loss


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def released_connector(conn, features: torch.Tensor, m: int, keys: str = "positional") -> torch.Tensor:
    """``[N, grid², Dv] -> [N, m, D]``: q = ln_q(query[:m] + pos[:m]); k = ln_k(pos resized bicubically to
    the grid) (``keys="features"``: ln_k(features + that)); v = ln_v(features); per-head softmax(q k^T / sqrt(d)) v;
    out_proj; @ proj. Computed in fp32."""
    p = {k: v.float() for k, v in conn.named_parameters()}
    dv, heads, grid = p["query"].shape[1], conn.attn.num_heads, math.isqrt(features.shape[1])
    side = math.isqrt(p["pos_embed"].shape[0])
    pos = p["pos_embed"]
    grid_pos = pos.reshape(1, side, side, dv).permute(0, 3, 1, 2)
    if side != grid:
        grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid * grid, dv)
    q = layer_norm(p["query"][:m] + pos[:m], p["ln_q.weight"], p["ln_q.bias"])
    x = features.float()
    k_in = grid_pos.expand(x.shape[0], -1, -1) if keys == "positional" else x + grid_pos
    k = layer_norm(k_in, p["ln_k.weight"], p["ln_k.bias"])
    v = layer_norm(x, p["ln_v.weight"], p["ln_v.bias"])
    wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
    d = dv // heads
    outs = []
    for n in range(x.shape[0]):
        qh = (q @ wq.T + bq).reshape(m, heads, d).transpose(0, 1)
        kh = (k[n] @ wk.T + bk).reshape(-1, heads, d).transpose(0, 1)
        vh = (v[n] @ wv.T + bv).reshape(-1, heads, d).transpose(0, 1)
        weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        mixed = (weights @ vh).transpose(0, 1).reshape(m, dv)
        outs.append((mixed @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]) @ p["proj"])
    return torch.stack(outs)


def image_rows(model, pixel_values: torch.Tensor, m: int) -> torch.Tensor:
    """Tower (hidden state -2 without CLS, Hugging Face code) + the released connector at m: ``[N, m, D]``."""
    tower = model.model.vision_tower
    feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    conn = model.model.query_abstractor
    return released_connector(conn, feats, m, conn.keys)


def count_rows(model, input_ids, attention_mask, pixel_values, labels, m: int):
    """Each row's valid tokens as embeddings, each image's M placeholders replaced by its m query outputs.
    Returns per row ``[len, D]`` embeddings and ``[len]`` labels."""
    image_id, num_queries = model.config.image_token_id, model.config.num_queries
    rows = image_rows(model, pixel_values, m) if pixel_values is not None else None
    embed = model.get_input_embeddings()
    out_embeds, out_labels, image = [], [], 0
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, lab = input_ids[b][keep], labels[b][keep]
        embeds, labs, t = [], [], 0
        while t < len(ids):
            if ids[t] == image_id:
                embeds.append(rows[image].to(embed.weight.dtype))
                labs += [-100] * m
                image, t = image + 1, t + num_queries
            else:
                embeds.append(embed(ids[t : t + 1]))
                labs.append(int(lab[t]))
                t += 1
        out_embeds.append(torch.cat(embeds))
        out_labels.append(torch.tensor(labs))
    return out_embeds, out_labels


def released_mqt_loss(model, input_ids, attention_mask, pixel_values, labels, counts):
    """``(mean over counts, per-count losses)``: one released-style forward per m, full fp32 logits each."""
    losses = []
    for m in counts:
        embeds, labs = count_rows(model, input_ids, attention_mask, pixel_values, labels, m)
        losses.append(padded_lm_loss(model, embeds, labs))
    per_count = torch.stack(losses)
    return per_count.mean(), per_count
