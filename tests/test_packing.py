"""pack_sequences, plan_matryoshka and pad_packed against naive python loops over their definitions."""

import pytest
import torch

from fastnest.packing import pack_sequences, pad_packed, plan_matryoshka
from fastnest.scales import MatryoshkaScales

IGN = -100
IMG = 99  # image placeholder id
PAD = 0


# ----------------------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------------------


def naive_pack(sources, labels=None, groups=None, context=None):
    """Plain loops: sequences end to end, next-token targets inside each sequence only.

    A sequence with a context c continues it: positions go on after c's tokens, keys are c's positions then
    its own (when both have tokens), and c's last token predicts its first label (those targets last).
    """
    context = context or [-1] * len(sources)
    cu, position_ids, source_index = [0], [], []
    logit_index, targets, target_group = [], [], []
    across = []
    for i, src in enumerate(sources):
        src = [int(v) for v in src]
        start = cu[-1]
        before = len(sources[context[i]]) if context[i] >= 0 else 0
        for p, v in enumerate(src):
            position_ids.append(before + p)
            source_index.append(v)
        if labels is not None:
            lab = [int(v) for v in labels[i]]
            group = groups[i] if groups is not None else 0
            for p in range(len(src) - 1):
                if lab[p + 1] != IGN:
                    logit_index.append(start + p)
                    targets.append(lab[p + 1])
                    target_group.append(group)
            if before and src and lab[0] != IGN:
                across.append((cu[context[i] + 1] - 1, lab[0], group))
        cu.append(start + len(src))
    for where, target, group in across:
        logit_index.append(where)
        targets.append(target)
        target_group.append(group)
    keys, seqlens_k, reads_context = [], [], False
    for i in range(len(sources)):
        own = list(range(cu[i], cu[i + 1]))
        c = context[i]
        shared = list(range(cu[c], cu[c + 1])) if c >= 0 and own else []
        keys += shared + own
        seqlens_k.append(len(shared) + len(own))
        reads_context |= bool(shared)
    return dict(
        cu_seqlens=cu,
        seqlens=[cu[i + 1] - cu[i] for i in range(len(sources))],
        position_ids=position_ids,
        source_index=source_index,
        logit_index=logit_index,
        targets=targets,
        target_group=target_group,
        context=list(context),
        seqlens_k=seqlens_k,
        cu_seqlens_k=[sum(seqlens_k[:i]) for i in range(len(seqlens_k) + 1)],
        key_index=keys if reads_context else None,
    )


def check_packed(packed, ref):
    assert packed.cu_seqlens.dtype == packed.cu_seqlens_k.dtype == torch.int32
    for name in ("position_ids", "source_index", "logit_index", "targets", "target_group"):
        assert getattr(packed, name).dtype == torch.int64, name
    assert packed.cu_seqlens.tolist() == ref["cu_seqlens"]
    assert list(packed.seqlens) == ref["seqlens"]
    assert isinstance(packed.seqlens, tuple) and isinstance(packed.seqlens_k, tuple)
    assert all(type(s) is int for s in packed.seqlens + packed.seqlens_k)
    for name in ("position_ids", "source_index", "logit_index", "targets", "target_group", "cu_seqlens_k"):
        assert getattr(packed, name).tolist() == ref[name], name
    assert list(packed.context) == ref["context"]
    assert list(packed.seqlens_k) == ref["seqlens_k"]
    if ref["key_index"] is None:
        assert packed.key_index is None
    else:
        assert packed.key_index.dtype == torch.int64
        assert packed.key_index.tolist() == ref["key_index"]
    assert packed.total == len(ref["source_index"])
    assert packed.max_seqlen == max(ref["seqlens"], default=0)
    assert packed.max_seqlen_k == max(ref["seqlens_k"], default=0)


def naive_plan(input_ids, attention_mask, labels, grid, scales, num_images, share_prefix=False):
    """The plan from its docstrings, by plain loops over the batch.

    source = [text tokens in row-major order of input_ids[valid & ~image]] + visual rows, visual row of
    (image i, scale k, token j) = num_text + i * total + offset(k) + j. A row with images: one sequence per scale
    (group = scale index); a text-only row: one sequence in group -1. Shared prefix (two or more scales): the
    text before a row's first image is a sequence of its own (group -1), the context of the row's scale
    sequences, which hold what follows it.
    """
    tpi = grid * grid
    total = sum(scales)
    offsets = [sum(scales[:k]) for k in range(len(scales))]
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
        n_placeholders = sum(int(input_ids[b][c]) == IMG for c in cols)
        assert n_placeholders % tpi == 0
        row_images = n_placeholders // tpi
        context = -1
        if share_prefix and len(scales) > 1 and row_images:
            first_image = next(i for i, c in enumerate(cols) if int(input_ids[b][c]) == IMG)
            prefix, cols = cols[:first_image], cols[first_image:]
            if prefix:
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
                    if run == tpi:  # one full image: its scale-k tokens
                        src += [num_text + img * total + offsets[k] + j for j in range(scales[k])]
                        lab += [IGN] * scales[k]
                        img, run = img + 1, 0
                else:
                    assert run == 0
                    src.append(text_row[(b, c)])
                    lab.append(int(labels[b][c]) if labels is not None else IGN)
            sources.append(src)
            seq_labels.append(lab)
            groups.append(k)
            contexts.append(context)
            rows.append(b)
        image += row_images
    assert image == num_images
    return dict(
        text_mask=text_mask,
        num_text=num_text,
        rows=rows,
        packed=naive_pack(sources, seq_labels if labels is not None else None, groups, contexts),
    )


# ----------------------------------------------------------------------------------------------------------------
# pack_sequences
# ----------------------------------------------------------------------------------------------------------------


def random_sequences(lengths, seed, p_ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    labels = []
    for n in lengths:
        lab = torch.randint(0, 500, (n,), generator=g)
        lab[torch.rand(n, generator=g) < p_ignore] = IGN
        labels.append(lab)
    return sources, labels


LENGTHS = [
    (5,),
    (1,),
    (0,),
    (3, 4),
    (4, 0, 3),
    (0, 2, 0, 0, 1, 5),
    (1, 1, 1),
    (7, 1, 0, 2, 6),
    (0, 0),
]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_pack_sequences(lengths):
    sources, labels = random_sequences(lengths, seed=len(lengths) * 7 + sum(lengths))
    groups = [(i % 3) - 1 for i in range(len(lengths))]  # -1, 0, 1, -1, ...
    packed = pack_sequences(sources, labels, groups)
    check_packed(packed, naive_pack(sources, labels, groups))


@pytest.mark.parametrize("seed", range(8))
def test_pack_sequences_random(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    lengths = torch.randint(0, 7, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
    sources, labels = random_sequences(lengths, seed)
    groups = torch.randint(-1, 4, (len(lengths),), generator=g).tolist()
    check_packed(pack_sequences(sources, labels, groups), naive_pack(sources, labels, groups))


def test_pack_no_cross_boundary_targets():
    # every label is set: the last token of each sequence must still predict nothing
    sources = [torch.arange(3), torch.arange(3, 5), torch.arange(5, 6), torch.arange(6, 10)]
    labels = [torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30]), torch.tensor([40, 41, 42, 43])]
    packed = pack_sequences(sources, labels, [0, 1, 2, 3])
    assert packed.logit_index.tolist() == [0, 1, 3, 6, 7, 8]
    assert packed.targets.tolist() == [11, 12, 21, 41, 42, 43]
    assert packed.target_group.tolist() == [0, 0, 1, 3, 3, 3]
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2, 3]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 6, 10]


def test_pack_without_labels_or_groups():
    sources, labels = random_sequences((3, 0, 2), seed=3)
    packed = pack_sequences(sources)
    ref = naive_pack(sources)
    check_packed(packed, ref)
    assert packed.logit_index.numel() == packed.targets.numel() == packed.target_group.numel() == 0

    packed = pack_sequences(sources, labels)  # groups default to 0
    check_packed(packed, naive_pack(sources, labels, [0, 0, 0]))


def test_pack_int32_sources():
    sources = [torch.tensor([5, 6], dtype=torch.int32), torch.tensor([7], dtype=torch.int32)]
    packed = pack_sequences(sources)
    assert packed.source_index.dtype == torch.int64
    assert packed.source_index.tolist() == [5, 6, 7]


def test_pack_to_keeps_everything():
    sources, labels = random_sequences((3, 2), seed=9)
    packed = pack_sequences(sources, labels, [1, -1])
    moved = packed.to("cpu")
    check_packed(moved, naive_pack(sources, labels, [1, -1]))


@pytest.mark.parametrize("labels, groups", [([torch.zeros(2)], None), (None, [0]), (None, [0, 1, 2])])
def test_pack_count_mismatch(labels, groups):
    sources = [torch.arange(2), torch.arange(3)]
    with pytest.raises(ValueError) as err:
        pack_sequences(sources, labels, groups)
    assert "2 sequences" in str(err.value)


CONTEXTS = [
    ((3, 2, 4), (-1, 0, 0)),  # one prefix, two continuations
    ((3, 0, 4, 2, 1), (-1, 0, 0, -1, 3)),  # an empty continuation: it reads no keys
    ((0, 3, 2), (-1, 0, -1)),  # an empty context: nothing to read
    ((2, 1, 3, 3), (-1, -1, 1, 0)),  # contexts out of order
    ((4, 5), (-1, -1)),  # none
]


@pytest.mark.parametrize("lengths, context", CONTEXTS)
def test_pack_sequences_with_context(lengths, context):
    sources, labels = random_sequences(lengths, seed=sum(lengths) + 3, p_ignore=0.2)
    groups = list(range(len(lengths)))
    packed = pack_sequences(sources, labels, groups, context)
    check_packed(packed, naive_pack(sources, labels, groups, context))
    check_packed(pack_sequences(sources, context=context), naive_pack(sources, context=context))


def test_pack_context_by_hand():
    # sequence 1 continues sequence 0: positions 3.., keys 0,1,2 then its own; 0's last token predicts 1's first
    packed = pack_sequences(
        [torch.arange(3), torch.arange(3, 5)], [torch.tensor([-100, 11, 12]), torch.tensor([20, 21])], [7, 8], [-1, 0]
    )
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4]
    assert packed.seqlens_k == (3, 5)
    assert packed.cu_seqlens_k.tolist() == [0, 3, 8]
    assert packed.key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert packed.logit_index.tolist() == [0, 1, 3, 2]
    assert packed.targets.tolist() == [11, 12, 21, 20]
    assert packed.target_group.tolist() == [7, 7, 8, 8]


@pytest.mark.parametrize("context", [(0, -1), (-1, 1), (-1, 2), (-1, 0, 1), (-1, -2), (-1,)])
def test_pack_bad_context(context):
    sources = [torch.arange(2), torch.arange(2, 4), torch.arange(4, 5)][: max(len(context), 2)]
    with pytest.raises(ValueError, match="context"):
        pack_sequences(sources, context=context)


def test_pad_packed_refuses_contexts():
    packed = pack_sequences([torch.arange(2), torch.arange(2, 4)], context=[-1, 0])
    with pytest.raises(ValueError, match="share_prefix=False"):
        pad_packed(packed, 0, left=True)


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
# pad_packed
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [(3, 1, 4), (2, 0, 5, 1), (4,), (1, 1), (0, 3)])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("pad_index", [-1, 7])
def test_pad_packed(lengths, left, pad_index):
    sources, labels = random_sequences(lengths, seed=sum(lengths))
    packed = pack_sequences(sources, labels, [0] * len(lengths))
    index, mask, where = pad_packed(packed, pad_index, left)

    n, width = len(lengths), max(lengths)
    ref_index = [[pad_index] * width for _ in range(n)]
    ref_mask = [[0] * width for _ in range(n)]
    ref_where = []
    for i, src in enumerate(sources):
        first = width - len(src) if left else 0
        for p, v in enumerate(src.tolist()):
            ref_index[i][first + p] = v
            ref_mask[i][first + p] = 1
            ref_where.append(i * width + first + p)
    assert index.shape == mask.shape == (n, width)
    assert index.tolist() == ref_index
    assert mask.tolist() == ref_mask
    assert where.tolist() == ref_where
    # where maps packed positions onto the flat padded layout
    assert torch.equal(index.reshape(-1)[where], packed.source_index)


@pytest.mark.parametrize("left", [False, True])
def test_pad_packed_where_finds_target_logits(left):
    # fake "logits" of the padded batch: each slot holds the source row it was filled from; the logits at
    # where[logit_index] must be those of the packed positions that predict the targets
    sources = [torch.tensor([10, 11, 12]), torch.tensor([20]), torch.tensor([30, 31])]
    labels = [torch.tensor([-100, 1, 2]), torch.tensor([3]), torch.tensor([-100, 4])]
    packed = pack_sequences(sources, labels)
    index, _, where = pad_packed(packed, -1, left)
    assert index.reshape(-1)[where[packed.logit_index]].tolist() == [10, 11, 30]
    assert packed.targets.tolist() == [1, 2, 4]
