"""plan_matryoshka against naive python loops over its definition, for one grid and for images of different grids."""

import pytest
import torch

from fastnest.layout import pooled_grid, query_prefix
from fastnest.plan import plan_matryoshka
from fastnest.scales import MatryoshkaScales
from tests.test_packing import IGN, IMG, PAD, check_packed, naive_pack


def naive_plan(
    input_ids, attention_mask, labels, grid, scales, num_images, share_prefix=False, images=None, max_length=None
):
    """The plan from its docstrings, by plain loops over the batch.

    source = [text tokens in row-major order of input_ids[valid & ~image]] + visual rows, visual row of
    (image i, scale k, token j) = num_text + i * total + offset(k) + j. A row with images: one sequence per scale
    (group = scale index); a text-only row: one sequence in group -1. Shared prefix (two or more scales): the
    text before a row's first image is a sequence of its own (group -1), the context of the row's scale
    sequences, which hold what follows it. ``images``: per image ``(grid, scales)`` when the images differ
    (visual rows then stack each image's ``sum(scales)`` rows in turn). ``max_length``: each row's sequence at
    each scale (its prefix included) is cut to its first ``max_length`` tokens.
    """
    images = images or [(grid, scales)] * num_images
    firsts = [sum(sum(sc) for _, sc in images[:i]) for i in range(len(images))]  # first visual row per image
    scales = images[0][1] if images else scales
    B, L = input_ids.shape
    valid = [[bool(attention_mask[b][c]) for c in range(L)] for b in range(B)]
    text_row = {}
    text_mask = [[False] * L for _ in range(B)]
    for b in range(B):
        for c in range(L):
            if valid[b][c] and int(input_ids[b][c]) != IMG:
                text_row[(b, c)] = len(text_row)
                text_mask[b][c] = True
    num_text = len(text_row)
    sources, seq_labels, groups, contexts, rows = [], [], [], [], []
    image = 0
    for b in range(B):
        cols = [c for c in range(L) if valid[b][c]]
        row_images = 0
        placeholders = sum(int(input_ids[b][c]) == IMG for c in cols)
        while placeholders > 0:
            placeholders -= images[image + row_images][0] ** 2
            row_images += 1
        assert placeholders == 0
        context, room = -1, max_length
        if share_prefix and len(scales) > 1 and row_images:
            first_image = next(i for i, c in enumerate(cols) if int(input_ids[b][c]) == IMG)
            prefix, cols = cols[:first_image][:max_length], cols[first_image:]
            if prefix:
                room = None if max_length is None else max_length - len(prefix)
                context = len(sources)
                sources.append([text_row[(b, c)] for c in prefix])
                seq_labels.append([int(labels[b][c]) if labels is not None else IGN for c in prefix])
                groups.append(-1)
                contexts.append(-1)
                rows.append(b)
        for k in range(len(scales)) if row_images else [-1]:
            src, lab = [], []
            img, run = image, 0
            for c in cols:
                if int(input_ids[b][c]) == IMG:
                    run += 1
                    g, sc = images[img]
                    if run == g * g:  # one full image: its scale-k tokens
                        off = sum(sc[:k])
                        src += [num_text + firsts[img] + off + j for j in range(sc[k])]
                        lab += [IGN] * sc[k]
                        img, run = img + 1, 0
                else:
                    assert run == 0
                    src.append(text_row[(b, c)])
                    lab.append(int(labels[b][c]) if labels is not None else IGN)
            sources.append(src[:room])
            seq_labels.append(lab[:room])
            groups.append(k)
            contexts.append(context)
            rows.append(b)
        image += row_images
    assert image == len(images)
    return dict(
        text_mask=text_mask,
        num_text=num_text,
        rows=rows,
        packed=naive_pack(sources, seq_labels if labels is not None else None, groups, contexts),
    )


# ----------------------------------------------------------------------------------------------------------------
# plan_matryoshka: hand-built processor-style batches, grid 2 (4 placeholders per image), scales (1, 4)
# ----------------------------------------------------------------------------------------------------------------

I4 = [IMG] * 4


def build_batch(rows, side, label_fn=None):
    """rows: token lists; returns right/left padded ids, mask and labels (text tokens labelled, ids 1..98)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), IGN)
    for b, r in enumerate(rows):
        cols = range(len(r)) if side == "right" else range(L - len(r), L)
        for c, t in zip(cols, r):
            ids[b, c] = t
            mask[b, c] = 1
            if t != IMG and (label_fn is None or label_fn(b, c, t)):
                labels[b, c] = t
    return ids, mask, labels


ROWS = {
    "mixed": [
        [1, 2, *I4, 3, 4, 5],  # one image
        [6, 7, 8],  # text only
        [9, *I4, 10, 11, *I4, 12],  # two images separated by text
        [13, *I4, *I4, 14, 15],  # two ADJACENT images: one run of 8
    ],
    "image_first_last": [
        [*I4, 20, 21],
        [22, 23, *I4],
        [*I4],  # image only: no targets
    ],
    "text_only": [[1, 2, 3], [4, 5], [6]],
    "three_adjacent": [[1, *I4, *I4, *I4], [2, 3, 4, 5, 6, 7]],
    "fully_padded_row": [[1, *I4, 2], [], [3, 4]],  # an all-padding row: one empty text-only sequence
}


def count_images(rows):
    return sum(r.count(IMG) for r in rows) // 4


def check_plan(plan, ref, num_images):
    assert plan.text_mask.dtype == torch.bool
    assert plan.text_mask.tolist() == ref["text_mask"]
    assert plan.num_text == ref["num_text"]
    assert plan.num_images == num_images
    assert tuple(plan.sequence_row) == tuple(ref["rows"])
    check_packed(plan.packed, ref["packed"])


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("scales", [(1, 4), (4, 1), (4,)])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_plan_matches_naive(name, side, scales, share_prefix):
    rows = ROWS[name]
    ids, mask, labels = build_batch(rows, side)
    n = count_images(rows)
    spec = MatryoshkaScales(2, scales)
    plan = plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=spec, num_images=n, share_prefix=share_prefix)
    check_plan(plan, naive_plan(ids, mask, labels, 2, scales, n, share_prefix), n)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_plan_answer_only_labels(side, share_prefix):
    # only some text tokens labelled (e.g. the answer): targets follow from labels, not from ids
    rows = ROWS["mixed"]
    ids, mask, labels = build_batch(rows, side, label_fn=lambda b, c, t: t % 2 == 1)
    n = count_images(rows)
    spec = MatryoshkaScales(2, (1, 4))
    plan = plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=spec, num_images=n, share_prefix=share_prefix)
    check_plan(plan, naive_plan(ids, mask, labels, 2, (1, 4), n, share_prefix), n)


@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_prefix_shrinks_the_packed_length(side):
    # each image row's text before its first image appears once instead of once per scale
    rows = ROWS["mixed"] + [[5, 6, 7, *I4, 8]]
    ids, mask, labels = build_batch(rows, side)
    n = count_images(rows)
    spec = MatryoshkaScales(2, (1, 4))
    shared, unshared = (
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=spec, num_images=n, share_prefix=s).packed
        for s in (True, False)
    )
    prefixes = [2, 1, 1, 3]  # image rows 0, 2, 3, 4
    assert unshared.total - shared.total == (len(spec.scales) - 1) * sum(prefixes)
    # every text token is labelled: a prefix of p tokens holds p - 1 targets, once (group -1) instead of per scale
    inside = sum(p - 1 for p in prefixes)
    assert unshared.targets.numel() - shared.targets.numel() == (len(spec.scales) - 1) * inside
    text_only = 2  # row 1: [6, 7, 8]
    assert int((shared.target_group == -1).sum()) == text_only + inside
    assert int((unshared.target_group == -1).sum()) == text_only


@pytest.mark.parametrize("max_length", [1, 2, 4, 6, 9])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_plan_max_length_matches_naive(max_length, share_prefix):
    # each row at each scale keeps its first max_length tokens (the original LLaVA truncates after splicing):
    # at scale 4 a row is cut where it is not at scale 1, and a prefix may fill the whole length
    rows = ROWS["mixed"] + [[5, 6, 7, *I4, 8]]
    ids, mask, labels = build_batch(rows, "right")
    n = count_images(rows)
    spec = MatryoshkaScales(2, (1, 4))
    plan = plan_matryoshka(
        ids, mask, labels, image_token_id=IMG, spec=spec, num_images=n, share_prefix=share_prefix, max_length=max_length
    )
    check_plan(plan, naive_plan(ids, mask, labels, 2, (1, 4), n, share_prefix, max_length=max_length), n)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_plan_max_length_must_be_positive(bad):
    ids, mask, labels = build_batch(ROWS["text_only"], "right")
    with pytest.raises(ValueError, match=rf"max_length must be a positive int .* got {bad!r}"):
        plan_matryoshka(
            ids, mask, labels, image_token_id=IMG, spec=MatryoshkaScales(2, (1, 4)), num_images=0, max_length=bad
        )


@pytest.mark.parametrize("share_prefix", [True, False])
def test_plan_one_marker_per_image_is_the_expanded_batch(share_prefix):
    # the original LLaVA marks each image with ONE token: pooled_grid(spec, placeholders=1) plans that batch as
    # the batch with each marker expanded to the grid's grid² placeholders
    marked = [[1, 2, IMG, 3, 4, 5], [6, 7, 8], [9, IMG, 10, 11, IMG, 12], [13, IMG, IMG, 14, 15]]
    expanded = [[t for v in row for t in (I4 if v == IMG else [v])] for row in marked]
    spec = MatryoshkaScales(2, (1, 4))
    one = plan_matryoshka(
        *build_batch(marked, "right"), image_token_id=IMG, layouts=[pooled_grid(spec, 1)] * 5, share_prefix=share_prefix
    )
    full = plan_matryoshka(
        *build_batch(expanded, "right"), image_token_id=IMG, spec=spec, num_images=5, share_prefix=share_prefix
    )
    for name in ("cu_seqlens", "position_ids", "source_index", "logit_index", "targets", "target_group"):
        assert getattr(one.packed, name).tolist() == getattr(full.packed, name).tolist(), name
    assert (one.num_text, one.visual_offsets, one.sequence_row) == (
        full.num_text,
        full.visual_offsets,
        full.sequence_row,
    )


def test_plan_without_labels_and_mask():
    rows = [[1, 2, *I4, 3], [4, *I4, *I4, 5]]  # same length: no padding needed
    ids, _, _ = build_batch(rows, "right")
    plan = plan_matryoshka(ids, None, None, image_token_id=IMG, spec=MatryoshkaScales(2, (1, 4)), num_images=3)
    ref = naive_plan(ids, torch.ones_like(ids), None, 2, (1, 4), 3, share_prefix=True)  # shared by default
    check_plan(plan, ref, 3)
    assert plan.packed.targets.numel() == 0


def test_plan_mixed_layout_by_hand():
    """The 'mixed' batch (right padded) spelled out by hand: guards the naive reference itself."""
    ids, mask, labels = build_batch(ROWS["mixed"], "right")
    spec = MatryoshkaScales(2, (1, 4))
    plan = plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=spec, num_images=5, share_prefix=False)
    # text rows: row0 1..5 -> 0..4; row1 6,7,8 -> 5..7; row2 9,10,11,12 -> 8..11; row3 13,14,15 -> 12..14
    # images over the batch: row0 -> 0; row2 -> 1, 2; row3 (one run of 8) -> 3, 4; 5 visual rows per image

    def v(i, k):  # visual rows of image i at scale index k (offsets 0 and 1)
        return [15 + 5 * i + (0, 1)[k] + j for j in range((1, 4)[k])]

    sources = [
        [0, 1, *v(0, 0), 2, 3, 4],
        [0, 1, *v(0, 1), 2, 3, 4],
        [5, 6, 7],
        [8, *v(1, 0), 9, 10, *v(2, 0), 11],
        [8, *v(1, 1), 9, 10, *v(2, 1), 11],
        [12, *v(3, 0), *v(4, 0), 13, 14],
        [12, *v(3, 1), *v(4, 1), 13, 14],
    ]
    assert plan.num_text == 15
    assert plan.sequence_row == (0, 0, 1, 2, 2, 3, 3)
    assert plan.packed.cu_seqlens.tolist() == [0, 6, 15, 18, 24, 36, 41, 52]
    assert plan.packed.source_index.tolist() == [i for s in sources for i in s]
    # per sequence (starts 0, 6, 15, 18, 24, 36, 41): positions whose next token is a labelled text token
    local = [[0, 2, 3, 4], [0, 5, 6, 7], [0, 1], [1, 2, 4], [4, 5, 10], [2, 3], [8, 9]]
    starts = [0, 6, 15, 18, 24, 36, 41]
    assert plan.packed.logit_index.tolist() == [s + p for s, ps in zip(starts, local) for p in ps]
    assert plan.packed.targets.tolist() == [2, 3, 4, 5, 2, 3, 4, 5, 7, 8, 10, 11, 12, 10, 11, 12, 14, 15, 14, 15]
    assert plan.packed.target_group.tolist() == [0] * 4 + [1] * 4 + [-1] * 2 + [0] * 3 + [1] * 3 + [0] * 2 + [1] * 2
    assert plan.packed.key_index is None and plan.packed.context == (-1,) * 7


def test_plan_mixed_layout_by_hand_shared_prefix():
    """The same batch with shared prefixes, by hand: each image row's leading text once, then its scales."""
    ids, mask, labels = build_batch(ROWS["mixed"], "right")
    plan = plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=MatryoshkaScales(2, (1, 4)), num_images=5)

    def v(i, k):
        return [15 + 5 * i + (0, 1)[k] + j for j in range((1, 4)[k])]

    sources = [
        [0, 1],  # row 0's prefix (text 1, 2)
        [*v(0, 0), 2, 3, 4],
        [*v(0, 1), 2, 3, 4],
        [5, 6, 7],  # text-only row
        [8],  # row 2's prefix
        [*v(1, 0), 9, 10, *v(2, 0), 11],
        [*v(1, 1), 9, 10, *v(2, 1), 11],
        [12],  # row 3's prefix
        [*v(3, 0), *v(4, 0), 13, 14],
        [*v(3, 1), *v(4, 1), 13, 14],
    ]
    packed = plan.packed
    assert plan.sequence_row == (0, 0, 0, 1, 2, 2, 2, 3, 3, 3)
    assert packed.context == (-1, 0, 0, -1, -1, 4, 4, -1, 7, 7)
    assert packed.cu_seqlens.tolist() == [0, 2, 6, 13, 16, 17, 22, 33, 34, 38, 48]
    assert packed.source_index.tolist() == [i for s in sources for i in s]
    positions = [range(2), range(2, 6), range(2, 9), range(3), range(1), range(1, 6), range(1, 12)]
    positions += [range(1), range(1, 5), range(1, 11)]
    assert packed.position_ids.tolist() == [p for r in positions for p in r]
    assert packed.seqlens_k == (2, 6, 9, 3, 1, 6, 12, 1, 5, 11)

    def r(a, b):
        return list(range(a, b))

    keys = [r(0, 2), r(0, 6), [0, 1, *r(6, 13)], r(13, 16), [16], r(16, 22), [16, *r(22, 33)], [33], [33, *r(34, 38)]]
    keys.append([33, *r(38, 48)])
    assert packed.key_index.tolist() == [k for ks in keys for k in ks]
    assert packed.logit_index.tolist() == [0, 2, 3, 4, 9, 10, 11, 13, 14, 17, 18, 20, 25, 26, 31, 35, 36, 45, 46]
    assert packed.targets.tolist() == [2, 3, 4, 5, 3, 4, 5, 7, 8, 10, 11, 12, 10, 11, 12, 14, 15, 14, 15]
    assert packed.target_group.tolist() == [-1, 0, 0, 0, 1, 1, 1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# plan_matryoshka errors
# ----------------------------------------------------------------------------------------------------------------

SPEC = MatryoshkaScales(2, (1, 4))


def plan(ids, mask, labels, num_images):
    return plan_matryoshka(ids, mask, labels, image_token_id=IMG, spec=SPEC, num_images=num_images)


@pytest.mark.parametrize("run", [1, 3, 5, 6, 7, 9])
@pytest.mark.parametrize("side", ["right", "left"])
def test_plan_bad_run_length(run, side):
    ids, mask, labels = build_batch([[1, 2, 3, 4], [5, *([IMG] * run), 6]], side)
    with pytest.raises(ValueError) as err:
        plan(ids, mask, labels, run // 4)
    msg = str(err.value)
    assert f"run of {run}" in msg
    assert "row 1" in msg
    assert str(IMG) in msg


@pytest.mark.parametrize("given", [0, 1, 2, 4, 5])
def test_plan_wrong_image_count(given):
    ids, mask, labels = build_batch([[1, *I4, 2], [3, *I4, *I4]], "left")  # 3 images
    with pytest.raises(ValueError) as err:
        plan(ids, mask, labels, given)
    msg = str(err.value)
    assert "3 image" in msg
    assert f"{given} images" in msg


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("where", ["padding", "placeholder"])
def test_plan_label_at_unlabellable_position(side, where):
    ids, mask, labels = build_batch([[1, 2, *I4, 3], [4, 5]], side)
    if where == "padding":
        row, col = 1, (4 if side == "right" else 0)  # a padding column of row 1
        assert mask[row, col] == 0
    else:
        row, col = 0, int((ids[0] == IMG).nonzero()[1])
    labels[row, col] = 77
    with pytest.raises(ValueError) as err:
        plan(ids, mask, labels, 1)
    msg = str(err.value)
    assert where in msg
    assert "77" in msg
    assert f"row {row}, column {col}" in msg


def test_plan_label_ignore_at_padding_is_fine_even_if_pad_equals_image_id():
    # padding columns holding the image id are not placeholders: they are dropped by the mask
    ids, mask, labels = build_batch([[1, *I4, 2], [3]], "right")
    ids[1, 1:] = IMG
    p = plan(ids, mask, labels, 1)
    check_plan(p, naive_plan(ids, mask, labels, 2, (1, 4), 1, share_prefix=True), 1)


def test_plan_shape_errors():
    ids, mask, labels = build_batch([[1, *I4, 2], [3]], "right")
    with pytest.raises(ValueError) as err:
        plan(ids[0], mask[0], labels[0], 1)
    assert str(tuple(ids[0].shape)) in str(err.value)
    with pytest.raises(ValueError) as err:
        plan(ids, mask[:, :-1], labels, 1)
    assert str(tuple(mask[:, :-1].shape)) in str(err.value)
    with pytest.raises(ValueError) as err:
        plan(ids, mask, labels[:1], 1)
    assert str(tuple(labels[:1].shape)) in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# images of different layouts in one batch: a 2x2 and a 3x3 grid, each with two scales
# ----------------------------------------------------------------------------------------------------------------

I9 = [IMG] * 9
MIXED_GRIDS = [  # rows, and the grid of each image in batch order
    ([[1, 2, *I4, 3, *I9, 4], [5, *I9, *I4, 6, 7], [8, 9]], [2, 3, 3, 2]),
    ([[*I9, 1], [2, *I4, *I4, *I9, 3]], [3, 2, 2, 3]),
]
GRID_SCALES = {2: (1, 4), 3: (9, 1)}


@pytest.mark.parametrize("case", range(len(MIXED_GRIDS)))
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_plan_images_of_two_grids(case, side, share_prefix):
    rows, grids = MIXED_GRIDS[case]
    ids, mask, labels = build_batch(rows, side)
    layouts = [pooled_grid(MatryoshkaScales(g, GRID_SCALES[g])) for g in grids]
    plan = plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts, share_prefix=share_prefix)
    images = [(g, GRID_SCALES[g]) for g in grids]
    check_plan(plan, naive_plan(ids, mask, labels, None, None, len(grids), share_prefix, images=images), len(grids))
    assert plan.num_visual_rows == sum(sum(GRID_SCALES[g]) for g in grids)
    assert plan.visual_offsets == tuple(sum(sum(GRID_SCALES[g]) for g in grids[:i]) for i in range(len(grids)))


def test_plan_run_that_does_not_split_into_the_images_layouts():
    ids, mask, labels = build_batch([[1, *I4, *I4, 2]], "right")  # 8 placeholders: two 2x2 images
    layouts = [pooled_grid(MatryoshkaScales(2, (1, 4))), pooled_grid(MatryoshkaScales(3, (9, 1)))]  # 4 + 9 = 13
    with pytest.raises(ValueError, match="input_ids hold 8 image placeholder tokens but the 2 images given take 13"):
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts)
    ids, mask, labels = build_batch([[1, *I9, 2, *I4, 3]], "right")  # 13 placeholders, in the other order
    with pytest.raises(ValueError, match=r"row 0 has a run of 9 .* column 1 .* from 0 on take \[4, 9\] placeholders"):
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts)
    with pytest.raises(ValueError, match="same number of scales"):
        plan_matryoshka(
            ids, mask, labels, image_token_id=IMG, layouts=[layouts[1], pooled_grid(MatryoshkaScales(2, (4,)))]
        )


@pytest.mark.parametrize("lead", [[1, 2], []])
def test_nested_image_joins_the_shared_prefix_by_hand(lead):
    """A query transformer's image (count k = its first counts[k] rows) is the same at every count up to that
    count: with a shared prefix it is packed once at the largest count, and each count's sequence continues the
    leading text and its own first tokens of it."""
    layout = query_prefix(4, (1, 3))
    assert layout.nested == 1 and pooled_grid(MatryoshkaScales(2, (1, 4))).nested is None
    row = lead + [IMG] * 4 + [3, 4]
    ids = torch.tensor([row])
    labels = torch.tensor([[IGN] * (len(lead) + 4) + [IGN, 4]])
    plan = plan_matryoshka(ids, None, labels, image_token_id=IMG, layouts=[layout])
    t, v = len(lead), len(lead) + 2  # text rows, then the image's 4 rows in the source
    packed = plan.packed
    assert packed.seqlens == (t + 3, 2, 2)
    assert packed.context == (-1, 0, 0) and packed.context_lens == (0, t + 1, t + 3)
    assert packed.source_index.tolist() == [*range(t), v, v + 1, v + 2, t, t + 1, t, t + 1]
    assert packed.position_ids.tolist() == [*range(t + 3), t + 1, t + 2, t + 3, t + 4]
    assert packed.targets.tolist() == [4, 4] and packed.target_group.tolist() == [0, 1]
    assert packed.logit_index.tolist() == [t + 3, t + 5]  # token 3 predicts 4 in each count's sequence
    unshared = plan_matryoshka(ids, None, labels, image_token_id=IMG, layouts=[layout], share_prefix=False).packed
    assert unshared.total - packed.total == t + 1  # the text once, and count 1's image token inside count 3's


def test_placeholder_count_mismatch_names_the_image_the_run_and_its_count():
    # images of different placeholder counts (4 and 9), one run each: the first image whose run misfits is named
    layouts = [pooled_grid(MatryoshkaScales(2, (1, 4))), pooled_grid(MatryoshkaScales(3, (9, 1)))]
    ids, mask, labels = build_batch([[1, *I4, 2], [3, *I4, 4]], "right")  # image 1's run holds 4, it takes 9
    with pytest.raises(ValueError, match=r"take 13; image 1 \(row 1, column 1\) meets a run of 4 .* where it takes 9"):
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts)
    ids, mask, labels = build_batch([[1, *I4, 2], [3, 4]], "right")  # image 1 has no run at all
    with pytest.raises(ValueError, match="take 13; images 1 and on have no placeholders"):
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts)
    ids, mask, labels = build_batch([[1, *I4, 2, *I9, 3, *I4]], "right")  # a run after the last image
    with pytest.raises(ValueError, match="has 4 placeholder tokens at column 16 after the last image"):
        plan_matryoshka(ids, mask, labels, image_token_id=IMG, layouts=layouts)
