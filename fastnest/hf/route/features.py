"""Routing features: what the model sees cheaply before it commits to a scale.

The routing pass is the patched model's own inference forward at ONE small scale (the router's smallest), over
the prompt only: each row up to its last prompt token, the position whose next-token distribution starts the
answer (with ``labels``: the token before the row's first labelled one; without: the row's last real token, as
``generate`` is given a prompt). The causal mask makes the columns after the longest prompt irrelevant, so they
are dropped. A row's features (``FEATURES``): the language model's final hidden state there (after its last
norm, what ``lm_head`` reads), then the largest probability and the entropy of the next-token distribution
``lm_head`` makes of it. One vector per row: a row with several images gets one decision for all of them.
"""

from __future__ import annotations

import torch

from ...constants import IGNORE_INDEX
from ..inference import scaled_inputs
from ..state import patch_state

FEATURES = "final hidden state at the prompt's last position, then its next-token max probability and entropy"


def prompt_ends(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` column of each row's last prompt token (module docstring); ValueError for a row without one."""
    valid = attention_mask.bool()
    width = valid.shape[1]
    columns = torch.arange(width, device=valid.device).expand_as(valid)
    if labels is None:
        ends = torch.where(valid, columns, -1).max(dim=1).values
        empty = ends < 0
        what = "no real token (attention_mask is all 0)"
    else:
        labelled = (labels != IGNORE_INDEX) & valid
        first = torch.where(labelled, columns, width).min(dim=1).values
        start = torch.where(valid, columns, width).min(dim=1).values
        empty = (first == width) | (first <= start)
        ends = first - 1
        what = "no prompt before its first labelled token (or no labelled token)"
    if bool(empty.any()):
        raise ValueError(f"row {int(empty.nonzero()[0])} has {what}: the routing pass reads the prompt's last token")
    return ends


@torch.no_grad()
def routing_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    scale: int,
    image_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, hidden + 2]`` float32 routing features (module docstring) of a patched model's batch at ``scale``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = {} if image_sizes is None else {"image_sizes": image_sizes}
    small = scaled_inputs(
        model, input_ids, attention_mask, pixel_values, labels=labels, scale=scale, image_sizes=image_sizes
    )
    ends = prompt_ends(small["attention_mask"], small.get("labels"))
    state = patch_state(model)
    images = (small["input_ids"] == state.adapter.image_token_id(model)).nonzero()
    keep = max(int(ends.max()), int(images[:, 1].max()) if len(images) else 0) + 1
    captured = []
    hook = state.adapter.language_model(model).register_forward_hook(
        lambda _m, _a, out: captured.append(out.last_hidden_state)
    )
    try:
        model(
            input_ids=small["input_ids"][:, :keep],
            attention_mask=small["attention_mask"][:, :keep],
            pixel_values=pixel_values,
            scale=scale,
            logits_to_keep=1,
            use_cache=False,
            **extra,
        )
    finally:
        hook.remove()
    hidden = captured[-1][torch.arange(len(ends), device=ends.device), ends.to(captured[-1].device)]
    logp = torch.log_softmax(state.adapter.lm_head(model)(hidden).float(), dim=-1)
    top = logp.max(dim=-1).values.exp()
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.cat([hidden.float(), top[:, None], entropy[:, None]], dim=1).cpu()
