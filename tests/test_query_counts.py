"""QueryCounts (the token counts a query transformer allows) and its layout, query_prefix."""

from __future__ import annotations

import pytest
import torch

from fastnest import MatryoshkaScales, QueryCounts, plan_matryoshka, query_prefix


def test_any_distinct_counts_in_range_order_kept():
    spec = QueryCounts(256, (64, 2, 256, 7))
    assert spec.scales == (64, 2, 256, 7)
    assert spec.tokens_per_image == 256
    assert [spec.index(m) for m in (64, 2, 256, 7)] == [0, 1, 2, 3]
    assert spec.only(7) == QueryCounts(256, (7,))


@pytest.mark.parametrize(
    "counts, match",
    [
        ((0,), r"token count 0 is not allowed .* 16 queries; allowed: ints in 1\.\.16"),
        ((17,), r"token count 17 .* 1\.\.16"),
        ((2.0,), r"token count 2\.0"),
        ((True,), r"token count True"),
        ((), r"must not be empty; allowed: any of 1\.\.16"),
        ((3, 3), r"distinct, got \(3, 3\)"),
    ],
)
def test_bad_counts_are_refused_naming_the_value(counts, match):
    with pytest.raises(ValueError, match=match):
        QueryCounts(16, counts)


def test_index_and_only_refuse_unconfigured_counts():
    spec = QueryCounts(16, (2, 4))
    with pytest.raises(ValueError, match=r"token count 3 is not configured; configured counts: \(2, 4\)"):
        spec.index(3)
    with pytest.raises(ValueError, match="token count 5"):
        spec.only(5)
    every = QueryCounts(16, range(1, 17))
    with pytest.raises(ValueError, match=r"token count 17 is not configured; configured counts: 1\.\.16"):
        every.index(17)


def test_same_interface_as_matryoshka_scales():
    for spec in (MatryoshkaScales(4, (1, 4, 16)), QueryCounts(16, (1, 4, 16))):
        assert spec.scales == (1, 4, 16) and spec.tokens_per_image == 16
        assert spec.index(4) == 1 and spec.only(4).scales == (4,)


def test_query_prefix_layout():
    layout = query_prefix(16, (3, 16, 1))
    assert (layout.placeholders, layout.rows, layout.num_scales) == (16, 16, 3)
    assert [t.tolist() for t in layout.tokens] == [[0, 1, 2], list(range(16)), [0]]
    assert query_prefix(16, (3, 16, 1)) is layout  # cached
    with pytest.raises(ValueError, match=r"token count 17 .* 1\.\.16"):
        query_prefix(16, (17,))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_plan_shows_each_count_the_first_rows(share_prefix):
    """M placeholders in the row; sequence k holds the first counts[k] visual rows, then the text after (with a
    shared prefix: the text before and all M rows once, each count's sequence continuing its first counts[k])."""
    ids = torch.tensor([[5, *[9] * 4, 6, 7]])
    labels = ids.masked_fill(ids == 9, -100)
    layouts = [query_prefix(4, (1, 4, 2))]
    plan = plan_matryoshka(ids, None, labels, image_token_id=9, layouts=layouts, share_prefix=share_prefix)
    p = plan.packed
    num_text = plan.num_text
    seqs = [p.source_index[a:b].tolist() for a, b in zip(p.cu_seqlens[:-1].tolist(), p.cu_seqlens[1:].tolist())]
    if share_prefix:
        assert seqs[0] == [0, *range(num_text, num_text + 4)] and p.context_lens == (0, 2, 5, 3)
        keys = [p.key_index[a:b].tolist() for a, b in zip(p.cu_seqlens_k[:-1].tolist(), p.cu_seqlens_k[1:].tolist())]
        seqs = [[p.source_index[i].item() for i in k] for k in keys[1:]]  # each count's keys: what it sees
    image_rows = [[i - num_text for i in s if num_text <= i < num_text + 4] for s in seqs]
    assert [r for r in image_rows if r] == [[0], [0, 1, 2, 3], [0, 1]]
