"""MQT-LLaVA (``fastnest.hf.MQTLlavaForConditionalGeneration``): its adapter and ``patch_mqt_llava``.

Each image is M placeholder tokens and M rows (the connector's query outputs); token count m is the first m
rows (``fastnest.layout.query_prefix``). A training step runs the connector once with M queries and every
count of the step in ONE packed language-model pass; inference shows each image as its first m outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..constants import IGNORE_INDEX
from ..dispatch import check_backend
from ..layout import query_prefix
from ..scales import QueryCounts
from .draw import TokenDraw
from .llava import LlavaAdapter, install
from .lm_kernels import check_choice as check_lm_kernels
from .mqt_model import MQTLlavaForConditionalGeneration
from .settings import stored_setting
from .state import PatchState


class MQTLlavaAdapter(LlavaAdapter):
    """LLaVA's tower and language model; ``model.model.query_abstractor`` as the connector."""

    model_type = "mqt_llava"

    def connector(self, model):
        return model.model.query_abstractor

    def num_queries(self, model) -> int:
        return self.connector(model).num_queries

    def image_layouts(self, model, spec, pixel_values, image_sizes=None):
        if image_sizes is not None:
            raise ValueError("image_sizes is not supported: mqt_llava reads one fixed-size grid per image")
        layout = query_prefix(self.num_queries(model), spec.scales)
        return [layout] * (0 if pixel_values is None else pixel_values.shape[0])

    def connector_rows(self, model, features, spec, backend):
        """Every image's M query outputs (one connector pass serves every count: the outputs are nested)."""
        return self.connector(model)(features)

    def dummy_row(self, model) -> dict[str, torch.Tensor]:
        row = super().dummy_row(model)
        ids = torch.tensor([self.image_token_id(model)] * self.num_queries(model) + [row["input_ids"][0, -1]])
        return {
            "input_ids": ids[None],
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "labels": torch.full((1, len(ids)), IGNORE_INDEX),
            "pixel_values": row["pixel_values"],
        }


MQT_LLAVA = MQTLlavaAdapter()


def released_counts(num_queries: int) -> tuple[int, ...]:
    """The counts the release draws from: ``2, 4, ..., M`` (``random.choice(range(2, M + 2, 2))``)."""
    return tuple(range(2, num_queries + 1, 2))


def _same(counts: QueryCounts) -> QueryCounts:
    return counts


def _draw(num_queries: int, num_tokens, seed: int) -> TokenDraw | QueryCounts:
    """The training counts: a fixed ``QueryCounts`` for a tuple of ints, else a per-step draw."""
    choices = released_counts(num_queries)
    if num_tokens == "released" or (
        isinstance(num_tokens, tuple) and len(num_tokens) == 2 and num_tokens[0] == "random"
    ):
        k = 1 if num_tokens == "released" else num_tokens[1]
        return TokenDraw(functools.partial(QueryCounts, num_queries), choices, k, seed)
    if isinstance(num_tokens, Sequence) and not isinstance(num_tokens, str):
        return QueryCounts(num_queries, num_tokens)  # ValueError naming a count outside 1..M
    raise ValueError(
        f"num_tokens must be a tuple of token counts in 1..{num_queries}, 'released' or ('random', k), "
        f"got {num_tokens!r}"
    )


def patch_mqt_llava(
    model: MQTLlavaForConditionalGeneration,
    num_tokens: Sequence[int] | str | tuple[str, int] | None = None,
    seed: int = 0,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
    lm_kernels: str = "auto",
) -> MQTLlavaForConditionalGeneration:
    """Make an MQT-LLaVA train on token counts in one packed forward, and infer at any count ``1..M``.

    ``num_tokens``: ``(m1, ..., mk)`` trains every listed count in each step (loss = mean of their token-mean
    losses; the connector runs once with M queries); ``"released"`` one count per step from {2, 4, ..., M},
    as the release (but drawn by a generator seeded with ``seed``, the same on every process: the release's
    ``random.choice`` is per process and unsynchronised; checked equal across processes when torch.distributed
    is initialised); ``("random", k)`` k distinct counts per step from
    that set, trained together. Stage 1 is ``num_tokens=(M,)``. Inference: ``model(..., scale=m)`` /
    ``generate(..., scale=m)`` for any ``1 <= m <= M`` (one, or one per image; default M). ``attention``,
    ``share_prefix``, ``backend``, ``lm_kernels``: as for ``patch_llava`` (the backend serves the fused loss).
    ``num_tokens`` defaults to the one stored in ``config.fastnest`` (``fastnest convert``), else ``"released"``.
    """
    if not isinstance(model, MQTLlavaForConditionalGeneration):
        raise TypeError(f"patch_mqt_llava expects an MQTLlavaForConditionalGeneration, got {type(model).__name__}")
    if backend not in (None, "auto"):
        check_backend("cross_entropy", backend)
    check_backend("attention", attention)
    num_queries = MQT_LLAVA.num_queries(model)
    if num_tokens is None:
        num_tokens = stored_setting(model, "num_tokens", "released")
    training = _draw(num_queries, num_tokens, seed)
    draw = training if isinstance(training, TokenDraw) else functools.partial(_same, training)
    every = QueryCounts(num_queries, range(1, num_queries + 1))  # inference: any count the connector allows
    kernels = check_lm_kernels(MQT_LLAVA.language_model(model), lm_kernels)
    state = PatchState(
        MQT_LLAVA, every, num_queries, backend, attention, bool(share_prefix), draw=draw, lm_kernels=kernels
    )
    return install(model, state)
