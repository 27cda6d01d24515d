"""MQT-LLaVA (``fastnest.hf.MQTLlavaForConditionalGeneration``): its adapter and ``patch_mqt_llava``.

Each image is M placeholder tokens and M rows (the connector's query outputs); token count m is the first m
rows (``fastnest.layout.query_prefix``). A training step runs the connector once with M queries and every
count of the step in ONE packed language-model pass; inference shows each image as its first m outputs.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import torch

from ..constants import IGNORE_INDEX
from ..dispatch import check_backend
from ..layout import query_prefix
from ..scales import QueryCounts
from .llava import LlavaAdapter, install
from .mqt_model import MQTLlavaForConditionalGeneration
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


class CountDraw:
    """The token counts of each training step, drawn from ``choices`` (k distinct per step) by a generator
    seeded with ``seed``: every process patched with the same seed draws the same counts, step by step."""

    def __init__(self, num_queries: int, choices: Sequence[int], k: int, seed: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(choices):
            raise ValueError(
                f"('random', k) needs an int k in 1..{len(choices)} (the counts {choices[0]}..{choices[-1]}), got {k!r}"
            )
        self.num_queries, self.choices, self.k = num_queries, tuple(choices), k
        self.rng = random.Random(seed)

    def __call__(self) -> QueryCounts:
        return QueryCounts(self.num_queries, sorted(self.rng.sample(self.choices, self.k)))

    def __repr__(self) -> str:
        return f"CountDraw(k={self.k}, from {self.choices[0]}..{self.choices[-1]})"


def _same(counts: QueryCounts) -> QueryCounts:
    return counts


def check_same_seed(seed: int) -> None:
    """With torch.distributed initialised, every process must draw from the same seed: ValueError otherwise."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    bounds = torch.tensor([seed, -seed], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MIN)
    low, high = int(bounds[0]), -int(bounds[1])
    if low != high:
        raise ValueError(
            f"seed differs across processes (from {low} to {high}; this one {seed}): the per-step token counts "
            "would differ; pass the same seed on every process"
        )


def _draw(num_queries: int, num_tokens, seed: int) -> CountDraw | QueryCounts:
    """The training counts: a fixed ``QueryCounts`` for a tuple of ints, else a per-step draw."""
    choices = released_counts(num_queries)
    if num_tokens == "released" or (
        isinstance(num_tokens, tuple) and len(num_tokens) == 2 and num_tokens[0] == "random"
    ):
        check_same_seed(seed)
        return CountDraw(num_queries, choices, 1 if num_tokens == "released" else num_tokens[1], seed)
    if isinstance(num_tokens, Sequence) and not isinstance(num_tokens, str):
        return QueryCounts(num_queries, num_tokens)  # ValueError naming a count outside 1..M
    raise ValueError(
        f"num_tokens must be a tuple of token counts in 1..{num_queries}, 'released' or ('random', k), "
        f"got {num_tokens!r}"
    )


def patch_mqt_llava(
    model: MQTLlavaForConditionalGeneration,
    num_tokens: Sequence[int] | str | tuple[str, int] = "released",
    seed: int = 0,
    attention: str = "auto",
    share_prefix: bool = True,
    backend: str | None = None,
) -> MQTLlavaForConditionalGeneration:
    """Make an MQT-LLaVA train on token counts in one packed forward, and infer at any count ``1..M``.

    ``num_tokens``: ``(m1, ..., mk)`` trains every listed count in each step (loss = mean of their token-mean
    losses; the connector runs once with M queries); ``"released"`` one count per step from {2, 4, ..., M},
    as the release (but drawn by a generator seeded with ``seed``, the same on every process: the release's
    ``random.choice`` is per process and unsynchronised; checked equal across processes when torch.distributed
    is initialised); ``("random", k)`` k distinct counts per step from
    that set, trained together. Stage 1 is ``num_tokens=(M,)``. Inference: ``model(..., scale=m)`` /
    ``generate(..., scale=m)`` for any ``1 <= m <= M`` (one, or one per image; default M). ``attention``,
    ``share_prefix``, ``backend``: as for ``patch_llava`` (the backend serves the fused loss).
    """
    if not isinstance(model, MQTLlavaForConditionalGeneration):
        raise TypeError(f"patch_mqt_llava expects an MQTLlavaForConditionalGeneration, got {type(model).__name__}")
    if backend not in (None, "auto"):
        check_backend("cross_entropy", backend)
    check_backend("attention", attention)
    num_queries = MQT_LLAVA.num_queries(model)
    training = _draw(num_queries, num_tokens, seed)
    draw = training if isinstance(training, CountDraw) else functools.partial(_same, training)
    every = QueryCounts(num_queries, range(1, num_queries + 1))  # inference: any count the connector allows
    state = PatchState(MQT_LLAVA, every, num_queries, backend, attention, bool(share_prefix), draw=draw)
    return install(model, state)
