"""flex: PyTorch FlexAttention with a document mask over the packed stream (no gather: contexts are found
where they lie). Forward anywhere, backward on CUDA only. The block mask comes from the sequence lengths
(``flex_mask``), one per sliding window a layer asks for, built once per step."""

from __future__ import annotations

import functools

import torch

from .flex_mask import build_block_mask

OPTIONS = frozenset({"sliding_window", "softcap", "s_aux"})
TAIL_QUERIES = False  # its block mask places each query at its packed position


class FlexMasks:
    """The step's block masks: the plain one built at once, one per sliding window on first use."""

    def __init__(self, info, device: torch.device) -> None:
        self._info, self._device = info, device
        self._masks = {None: build_block_mask(info, device)}

    def get(self, window: int | None):
        if window not in self._masks:
            self._masks[window] = build_block_mask(self._info, self._device, window)
        return self._masks[window]


def prepare(info, device: torch.device) -> FlexMasks:
    return FlexMasks(info, device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def _softcap(cap: float):
    def score_mod(score, b, h, q_idx, kv_idx):  # the score is already scaled
        return cap * torch.tanh(score / cap)

    return score_mod


def attend(q, k, v, info, scale, dropout, sliding_window=None, softcap=None, s_aux=None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    if dropout:
        raise ValueError(f"FlexAttention has no attention dropout (got dropout={dropout}); use another backend")
    # compiled on CUDA (eager flex materialises every score); eager on CPU, where only the forward runs
    run = _compiled_flex() if q.is_cuda else flex_attention
    q_, k_, v_ = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, d] views
    out = run(
        q_,
        k_,
        v_,
        score_mod=None if softcap is None else _softcap(float(softcap)),
        block_mask=info.prepared.get(sliding_window),
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
        return_aux=None if s_aux is None else AuxRequest(lse=True),
    )
    if s_aux is not None:  # a sink logit a in the denominator: out * sum(e^s) / (sum(e^s) + e^a)
        out, aux = out
        keep = torch.sigmoid(aux.lse - s_aux.float()[None, :, None])  # [1, H, T]
        out = (out.float() * keep[..., None]).to(out.dtype)
    return out[0].transpose(0, 1)
