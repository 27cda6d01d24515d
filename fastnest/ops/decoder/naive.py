"""The plain references of the decoder's elementwise ops, as Hugging Face's Llama writes them (LlamaRMSNorm,
act_fn(gate) * up with SiLU, apply_rotary_pos_emb) on tokens-major tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x², -1) + eps))``, the normalisation in fp32, rounded to x's dtype before the
    weight multiplies."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, d]``, ``cos``/``sin [T, d]``: ``x * cos + rotate_half(x) * sin`` per head."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
