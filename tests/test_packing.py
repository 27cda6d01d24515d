"""pack_sequences and pad_packed against naive python loops over their definitions."""

import pytest
import torch

from fastnest.packing import pack_sequences, pad_packed, ranges

IGN = -100
IMG = 99  # image placeholder id
PAD = 0


# ----------------------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------------------


def naive_pack(sources, labels=None, groups=None, context=None, context_lens=None):
    """Plain loops: sequences end to end, next-token targets inside each sequence only.

    A sequence with a context c continues its first ``context_lens[i]`` tokens (default: all): positions go on
    after them, keys are their positions then its own (when both have tokens), and the last of them predicts
    its first label (those targets last).
    """
    context = context or [-1] * len(sources)
    if context_lens is None:
        context_lens = [len(sources[c]) if c >= 0 else 0 for c in context]
    cu, position_ids, source_index = [0], [], []
    logit_index, targets, target_group = [], [], []
    across = []
    for i, src in enumerate(sources):
        src = [int(v) for v in src]
        start = cu[-1]
        before = context_lens[i] if context[i] >= 0 else 0
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
                across.append((cu[context[i]] + before - 1, lab[0], group))
        cu.append(start + len(src))
    for where, target, group in across:
        logit_index.append(where)
        targets.append(target)
        target_group.append(group)
    keys, seqlens_k, reads_context = [], [], False
    for i in range(len(sources)):
        own = list(range(cu[i], cu[i + 1]))
        c = context[i]
        shared = list(range(cu[c], cu[c] + context_lens[i])) if c >= 0 and own else []
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
        context_lens=[n if c >= 0 else 0 for c, n in zip(context, context_lens)],
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
    assert list(packed.context_lens) == ref["context_lens"]
    assert list(packed.seqlens_k) == ref["seqlens_k"]
    if ref["key_index"] is None:
        assert packed.key_index is None
    else:
        assert packed.key_index.dtype == torch.int64
        assert packed.key_index.tolist() == ref["key_index"]
    assert packed.total == len(ref["source_index"])
    assert packed.max_seqlen == max(ref["seqlens"], default=0)
    assert packed.max_seqlen_k == max(ref["seqlens_k"], default=0)


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


# a context of nested prefixes (a query transformer's image): each continuation reads its first n tokens
PARTIAL = [
    ((5, 2, 3, 1), (-1, 0, 0, 0), (0, 2, 4, 1)),
    ((4, 3, 0, 2), (-1, 0, 0, -1), (0, 1, 3, 0)),  # an empty continuation reads nothing
    ((3, 2, 2), (-1, 0, 0), (0, 0, 3)),  # a continuation of none of its context's tokens
]


@pytest.mark.parametrize("lengths, context, context_lens", PARTIAL)
def test_pack_sequences_with_partial_context(lengths, context, context_lens):
    sources, labels = random_sequences(lengths, seed=sum(lengths) + 5, p_ignore=0.2)
    groups = list(range(len(lengths)))
    packed = pack_sequences(sources, labels, groups, context, context_lens)
    check_packed(packed, naive_pack(sources, labels, groups, context, context_lens))


def test_pack_partial_context_by_hand():
    # sequence 1 continues the first 2 of sequence 0's 4 tokens: positions 2.., keys 0, 1 then its own;
    # token 1 (the last continued) predicts 1's first label
    packed = pack_sequences(
        [torch.arange(4), torch.arange(4, 6)],
        [torch.tensor([-100, 11, 12, 13]), torch.tensor([20, 21])],
        [7, 8],
        [-1, 0],
        [0, 2],
    )
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 2, 3]
    assert packed.seqlens_k == (4, 4)
    assert packed.key_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]
    assert packed.logit_index.tolist() == [0, 1, 2, 4, 1]
    assert packed.targets.tolist() == [11, 12, 13, 21, 20]


@pytest.mark.parametrize("context_lens", [(0, 3), (0, -1), (1, 1), (0,)])
def test_pack_bad_context_lens(context_lens):
    sources = [torch.arange(2), torch.arange(2, 4)]
    with pytest.raises(ValueError, match="context_lens|context lengths"):
        pack_sequences(sources, context=[-1, 0], context_lens=context_lens)


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


@pytest.mark.parametrize("starts, lengths", [((3, 0, 7), (2, 0, 3)), ((5,), (4,)), ((), ()), ((1, 1), (0, 0))])
def test_ranges_concatenates_aranges(starts, lengths):
    expected = [p for a, n in zip(starts, lengths) for p in range(a, a + n)]
    got = ranges(torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))
    assert got.dtype == torch.int64
    assert got.tolist() == expected
