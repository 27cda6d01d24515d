"""grouped_cross_entropy against a direct float64 computation, group by group."""

import pytest
import torch

from fastnest.ops.cross_entropy.naive import grouped_cross_entropy


def direct_ce(logits, targets):
    """Per-target cross-entropy written out: logsumexp(z) - z[target], in float64."""
    z = logits.double()
    rows = []
    for i in range(z.shape[0]):
        m = z[i].max()
        lse = m + torch.log(torch.exp(z[i] - m).sum())
        rows.append(lse - z[i, int(targets[i])])
    return torch.stack(rows) if rows else z.new_zeros(0)


def direct_grouped(logits, targets, target_group, num_groups, num_items=None):
    """Group g: mean CE over its own targets plus every group -1 target (or sum / num_items); loss = mean."""
    ce = direct_ce(logits, targets)
    per_group = []
    for g in range(num_groups):
        members = [i for i in range(len(targets)) if int(target_group[i]) in (g, -1)]
        total = sum((ce[i] for i in members), logits.new_zeros((), dtype=torch.float64))
        denom = len(members) if num_items is None else float(num_items)
        per_group.append(total / denom)
    per_group = torch.stack(per_group)
    return per_group.mean(), per_group


def make(n, vocab, groups, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    target_group = torch.tensor(groups, dtype=torch.long)
    assert target_group.numel() == n
    return logits, targets, target_group


GROUPINGS = [
    ([0, 0, 1, 1, 1, 2], 3),  # no shared targets
    ([-1, 0, 1, -1, 1, 1, 0, -1], 2),  # shared (text-only) targets count towards both groups
    ([-1, -1, 0, 2, 2, 1, -1, 3, 3, 3], 4),
    ([0, 0, 0, 0], 1),
    ([-1, -1, 0], 2),  # group 1 has only shared targets
    ([2, 1, 0, 2, 1, 0, -1], 3),
]


@pytest.mark.parametrize("groups, num_groups", GROUPINGS)
def test_per_group_losses(groups, num_groups):
    logits, targets, tg = make(len(groups), 11, groups, seed=len(groups))
    loss, per_group = grouped_cross_entropy(logits, targets, tg, num_groups)
    ref_loss, ref_per_group = direct_grouped(logits, targets, tg, num_groups)
    assert per_group.shape == (num_groups,)
    assert loss.dtype == per_group.dtype == torch.float32
    torch.testing.assert_close(per_group.double(), ref_per_group, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)


def test_by_hand_two_groups():
    # uniform logits: every CE is log(V); group sizes differ, so only the division differs
    vocab = 5
    logits = torch.zeros(5, vocab)
    logits[2, 3] = 2.0  # target 3 of row 2 gets a lower CE
    targets = torch.tensor([0, 1, 3, 4, 2])
    tg = torch.tensor([0, 0, 1, -1, 1])
    ln_v = torch.log(torch.tensor(5.0, dtype=torch.float64))
    ce2 = torch.log(4 + torch.exp(torch.tensor(2.0, dtype=torch.float64))) - 2.0
    g0 = (3 * ln_v) / 3  # rows 0, 1, 3
    g1 = (ce2 + 2 * ln_v) / 3  # rows 2, 3, 4
    loss, per_group = grouped_cross_entropy(logits, targets, tg, 2)
    torch.testing.assert_close(per_group.double(), torch.stack([g0, g1]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), (g0 + g1) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups, num_groups", GROUPINGS[1:4])
@pytest.mark.parametrize("num_items", [1, 7, 23.0, "tensor"])
def test_num_items_overrides_denominator(groups, num_groups, num_items):
    logits, targets, tg = make(len(groups), 13, groups, seed=3)
    n = torch.tensor(17) if num_items == "tensor" else num_items
    loss, per_group = grouped_cross_entropy(logits, targets, tg, num_groups, num_items=n)
    ref_loss, ref_per_group = direct_grouped(logits, targets, tg, num_groups, num_items=float(n))
    torch.testing.assert_close(per_group.double(), ref_per_group, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups, num_groups", GROUPINGS)
@pytest.mark.parametrize("num_items", [None, 9])
def test_gradient(groups, num_groups, num_items):
    logits, targets, tg = make(len(groups), 7, groups, seed=5)
    x = logits.clone().requires_grad_(True)
    loss, per_group = grouped_cross_entropy(x, targets, tg, num_groups, num_items=num_items)
    w = torch.linspace(0.5, 2.0, num_groups)
    (loss + (w * per_group).sum()).backward()

    ref = logits.double().requires_grad_(True)
    ref_loss, ref_per_group = direct_grouped(ref, targets, tg, num_groups, num_items=num_items)
    (ref_loss + (w.double() * ref_per_group).sum()).backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_give_fp32(dtype):
    groups = [-1, 0, 1, 1, 0, -1, 2, 2]
    logits, targets, tg = make(len(groups), 300, groups, seed=8, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss, per_group = grouped_cross_entropy(x, targets, tg, 3)
    assert loss.dtype == torch.float32
    assert per_group.dtype == torch.float32
    # the half logits are exact in float64: the fp32 accumulation must be fp32-accurate, not half-accurate
    ref_loss, ref_per_group = direct_grouped(logits, targets, tg, 3)
    torch.testing.assert_close(per_group.double(), ref_per_group, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert x.grad.dtype == dtype
    ref = logits.double().requires_grad_(True)
    direct_grouped(ref, targets, tg, 3)[0].backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=tol, atol=tol * 1e-2)


def test_loss_is_mean_of_groups_not_of_tokens():
    # group 0 has 1 target, group 1 has 3: a token mean over all targets would weight group 1 three times
    groups = [0, 1, 1, 1]
    logits, targets, tg = make(4, 6, groups, seed=1)
    loss, per_group = grouped_cross_entropy(logits, targets, tg, 2)
    ce = direct_ce(logits, targets)
    torch.testing.assert_close(loss.double(), (ce[0] + ce[1:].mean()) / 2, rtol=1e-6, atol=1e-6)


def test_ignored_targets_count_nowhere():
    # -100 targets add to no group's sum or count; a group left without targets has loss 0/0 = NaN
    groups = [0, 0, 1, -1, 2, 2]
    logits, targets, tg = make(6, 9, groups, seed=2)
    targets[[1, 3]] = -100
    _, per_group = grouped_cross_entropy(logits, targets, tg, 3)
    ce = direct_ce(logits, targets.clamp(min=0))
    expected = torch.stack([ce[0], ce[2], (ce[4] + ce[5]) / 2])
    torch.testing.assert_close(per_group.double(), expected, rtol=1e-6, atol=1e-6)
    targets[2] = -100
    assert torch.isnan(grouped_cross_entropy(logits, targets, tg, 3)[1][1])
