"""``MatryoshkaQueryTransformer``: the MQT connector (Hu et al.), M learned queries, any first m of them.

One cross-attention layer maps a ``grid x grid`` map of vision features to ``M`` query outputs, then a
``proj`` matrix to the language model's width. Queries never attend to each other, so the first ``m`` of the
``M`` outputs are the ``m``-query outputs: one pass at ``M`` serves every ``m <= M`` (nested by construction).

``keys="positional"`` is the released connector (gordonhu608/MQT-LLaVA, ``Resampler``): keys are the
LayerNormed positional table resized to the grid, so the attention weights do not depend on the image (the
image enters through the values only). ``keys="features"`` is the cross-attention the paper describes (as in
the Qwen-VL resampler it derives from): keys = LN(features + positions). Parameter names are the release's
(``query``, ``pos_embed``, ``attn``, ``ln_q``, ``ln_k``, ``ln_v``, ``proj``), so its
``model.query_abstractor.*`` weights load as they are; ``attn`` (an ``nn.MultiheadAttention``) holds the
attention's weights, and the forward computes its attention with them (without a key padding mask or
added key/value biases), projecting what does not depend on the image once per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KEY_MODES = ("positional", "features")


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """``[side², dim]`` 2-D sine-cosine positions of a ``side x side`` grid, row-major: the first half of the
    channels encode the row, the second half the column (each half: sines, then cosines)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(side, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angle = p.reshape(-1, 1) * freq
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(row), encode(col)], dim=1).float()


def resize_positions(table: torch.Tensor, side: int) -> torch.Tensor:
    """``[s², D]`` positions of an ``s x s`` grid resized bicubically (in fp32) to ``side x side``."""
    src = math.isqrt(table.shape[0])
    if src == side:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)


class MatryoshkaQueryTransformer(nn.Module):
    """``[N, grid², vision_dim] -> [N, m, out_dim]`` for any ``1 <= m <= num_queries``.

    ``num_queries`` (M) must be a perfect square: ``pos_embed`` is a ``sqrt(M) x sqrt(M)`` table (sin-cos at
    initialisation; a checkpoint's trained table is loaded, never recomputed), resized bicubically to the key
    grid. The attention width is ``vision_dim`` (``num_heads`` must divide it). Computes in the parameters'
    dtype (features are cast to it); ``pos_embed`` follows that dtype whatever it was stored in.
    """

    def __init__(
        self,
        vision_dim: int,
        out_dim: int,
        num_queries: int = 256,
        num_heads: int = 16,
        grid: int = 24,
        keys: str = "positional",
    ) -> None:
        super().__init__()
        for name, value in (("vision_dim", vision_dim), ("out_dim", out_dim), ("num_queries", num_queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        if math.isqrt(num_queries) ** 2 != num_queries:
            raise ValueError(
                f"num_queries must be a perfect square (its positions form a square grid), got {num_queries}"
            )
        if not isinstance(num_heads, int) or num_heads < 1 or vision_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing vision_dim={vision_dim}, got {num_heads!r}")
        if keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {KEY_MODES}, got {keys!r}")
        self.vision_dim, self.out_dim, self.num_queries = vision_dim, out_dim, num_queries
        self.num_heads, self.grid, self.keys = num_heads, grid, keys
        self.query = nn.Parameter(torch.empty(num_queries, vision_dim))
        self.pos_embed = nn.Parameter(torch.empty(num_queries, vision_dim))
        self.attn = nn.MultiheadAttention(vision_dim, num_heads)
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(vision_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(vision_dim, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: queries trunc-normal(0.02), sin-cos positions, ``proj`` ~ N(0, 1/D)."""
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=0.02)
            self.pos_embed.copy_(sincos_2d(self.vision_dim, math.isqrt(self.num_queries)))
            self.proj.normal_(0.0, self.vision_dim**-0.5)
        self.attn._reset_parameters()
        for norm in (self.ln_q, self.ln_k, self.ln_v):
            norm.reset_parameters()

    def check_count(self, num_tokens: int) -> int:
        """``num_tokens`` if it is an int in ``1..num_queries``; ValueError naming the value otherwise."""
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or not 1 <= num_tokens <= self.num_queries:
            raise ValueError(
                f"num_tokens must be an int in 1..{self.num_queries} (the connector's queries), got {num_tokens!r}"
            )
        return num_tokens

    def forward(self, features: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """``features [N, grid², vision_dim]`` -> ``[N, m, out_dim]``, ``m = num_tokens`` (default: all M)."""
        m = self.num_queries if num_tokens is None else self.check_count(num_tokens)
        expected = (self.grid * self.grid, self.vision_dim)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"features must be [N, {expected[0]}, {expected[1]}] (a {self.grid}x{self.grid} grid of "
                f"{self.vision_dim}-wide features), got {tuple(features.shape)}"
            )
        dtype = self.query.dtype
        x = features.to(dtype)
        pos = self.pos_embed.to(dtype)
        w_q, w_k, w_v = self.attn.in_proj_weight.to(dtype).chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.to(dtype).chunk(3)
        grid_pos = resize_positions(pos, self.grid)  # [grid², D]
        # Queries (and, with positional keys, the keys) do not depend on the image: projected once per call.
        q = F.linear(self.ln_q(self.query[:m] + pos[:m]), w_q, b_q)[None]
        key_in = grid_pos[None] if self.keys == "positional" else x + grid_pos
        k = F.linear(self.ln_k(key_in), w_k, b_k)
        v = F.linear(self.ln_v(x), w_v, b_v)
        n = x.shape[0]
        heads = [self._heads(t, n) for t in (q, k, v)]
        dropout = self.attn.dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(*heads, dropout_p=dropout)  # [N, heads, m, d]
        out_proj = self.attn.out_proj
        out = F.linear(
            mixed.transpose(1, 2).reshape(n, m, self.vision_dim), out_proj.weight.to(dtype), out_proj.bias.to(dtype)
        )
        return out @ self.proj.to(dtype)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """``[1 or N, L, D] -> [N, heads, L, D / heads]`` (a shared tensor is expanded, not copied)."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2).expand(n, -1, -1, -1)

    def extra_repr(self) -> str:
        return (
            f"vision_dim={self.vision_dim}, out_dim={self.out_dim}, num_queries={self.num_queries}, "
            f"num_heads={self.num_heads}, grid={self.grid}, keys={self.keys!r}"
        )
