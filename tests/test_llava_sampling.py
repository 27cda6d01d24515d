"""patch_llava(sampling="random"): each training step runs one scale drawn by a seeded generator (the M3 paper's
random-scale ablation), and its loss and gradients are the released loop's at that scale alone."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import fastnest
from tests.test_llava import MIXED_ROWS, SCALES, build
from tools.batches import make_batch
from tools.compare import assert_grads_match
from tools.m3_reference import released_m3_loss


def test_one_drawn_scale_per_step_equals_the_released_loss_at_it():
    ref = build(0).train()
    batch = make_batch(ref, [list(r) for r in MIXED_ROWS])
    fast = fastnest.patch_llava(copy.deepcopy(ref), scales=SCALES, sampling="random", seed=11).train()
    expected = random.Random(11)  # the draw restated: one of the scales per step
    drawn = []
    for _ in range(4):
        want = expected.sample(SCALES, 1)
        ref.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)
        out = fast(**batch.inputs())
        assert out.scales == tuple(want) and out.scale_losses.shape == (1,)
        ref_loss, _ = released_m3_loss(ref, **batch.inputs(), scales=tuple(want))
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
        out.loss.backward()
        ref_loss.backward()
        assert_grads_match(ref, fast)
        drawn += want
    assert len(set(drawn)) > 1  # the steps draw, not one scale over and over


def test_same_seed_same_draws_and_inference_keeps_every_scale():
    a, b = (fastnest.patch_llava(build(0), sampling="random", seed=3) for _ in range(2))
    sa, sb = fastnest.patch_state(a), fastnest.patch_state(b)
    assert [sa.training_spec().scales for _ in range(6)] == [sb.training_spec().scales for _ in range(6)]
    assert sa.spec.scales == SCALES  # inference may use any scale
    every = fastnest.patch_state(fastnest.patch_llava(build(0)))
    assert every.training_spec().scales == SCALES


def test_bad_sampling_is_refused():
    with pytest.raises(ValueError, match=r"sampling must be one of \('all', 'random'\), got 'some'"):
        fastnest.patch_llava(build(0), sampling="some")
