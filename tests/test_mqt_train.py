"""Training an MQT-LLaVA through fastnest.patch(model, num_tokens=...) against the released objective written
plainly (tools/mqt_reference.py: the connector one m at a time, full LM, full fp32 logits, CE; mean over m)."""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

import fastnest
from fastnest.hf import patch_state
from fastnest.hf.tiny import tiny_mqt_llava
from tools.batches import IMG, make_batch
from tools.compare import assert_grads_match
from tools.mqt_reference import released_mqt_loss

M = 16
ROWS = ((10, IMG, 20), (IMG, 15), (12,), (5, IMG, 4, IMG, 9))


def build(seed=0, keys="positional"):
    torch.manual_seed(seed)
    model = tiny_mqt_llava(num_queries=M, query_keys=keys).train()
    with torch.no_grad():
        model.model.query_abstractor.pos_embed.add_(0.1 * torch.randn(M, 32))
    return model


@functools.cache
def reference_step(keys: str, counts: tuple[int, ...]):
    """The released objective's loss, per-count losses and gradients on a fresh model."""
    ref = build(keys=keys)
    batch = make_batch(ref, [list(r) for r in ROWS], tokens_per_image=M)
    loss, per = released_mqt_loss(ref, **batch.inputs(), counts=counts)
    loss.backward()
    return ref, batch, loss.detach(), per.detach()


def patched(ref, **options):
    fast = fastnest.patch(copy.deepcopy(ref), **options).train()
    fast.zero_grad(set_to_none=True)
    return fast


def check_step(fast, keys, counts_of_step=None, share_prefix=True):
    ref_model = build(keys=keys)
    batch = make_batch(ref_model, [list(r) for r in ROWS], tokens_per_image=M)
    out = fast(**batch.inputs())
    ref, _, loss, per = reference_step(keys, tuple(out.scales))
    if counts_of_step is not None:
        assert tuple(out.scales) == counts_of_step
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.scale_losses, per, rtol=1e-5, atol=0)
    out.loss.backward()
    assert_shift_grads_vanish(ref, fast)
    assert_grads_match(ref, fast, rtol=2e-4)
    return out


def assert_shift_grads_vanish(ref, fast):
    """Key biases (the tower's ``k_proj.bias``, the connector's ``ln_k.bias``) shift every key of a query by
    the same amount, which softmax ignores: their gradients are zero analytically and round-off in both
    models. Check that, then leave them out of the comparison."""
    largest = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for model in (ref, fast):
        for name, p in model.named_parameters():
            if name.endswith(("k_proj.bias", "ln_k.bias")) and p.grad is not None:
                assert p.grad.abs().max().item() < 1e-6 * largest, name
                p.grad.zero_()


@pytest.mark.parametrize("keys", ["positional", "features"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared", "unshared"])
def test_listed_counts_in_one_packed_pass_equal_the_reference(keys, share_prefix):
    counts = (3, M, 8, 1)
    ref, *_ = reference_step(keys, counts)
    fast = patched(build(keys=keys), num_tokens=counts, share_prefix=share_prefix)
    out = check_step(fast, keys, counts)
    assert out.lm_tokens > 0


def test_released_mode_draws_one_even_count_per_step_seeded():
    ref = build()
    fast = patched(ref, num_tokens="released", seed=7)
    twin = patched(ref, num_tokens="released", seed=7)  # another process patched with the same seed
    draws = [patch_state(fast).training_spec().scales for _ in range(50)]
    assert draws == [patch_state(twin).training_spec().scales for _ in range(50)]
    assert all(len(d) == 1 and d[0] % 2 == 0 and 2 <= d[0] <= M for d in draws)
    assert len({d[0] for d in draws}) > 3
    rng = random.Random(7)  # the draw restated: one of 2, 4, ..., M per step
    fresh = patched(ref, num_tokens="released", seed=7)
    assert [patch_state(fresh).training_spec().scales[0] for _ in range(20)] == [
        rng.sample(range(2, M + 1, 2), 1)[0] for _ in range(20)
    ]
    check_step(patched(ref, num_tokens="released", seed=3), "positional")


def test_random_k_trains_k_distinct_counts_together():
    ref = build()
    fast = patched(ref, num_tokens=("random", 3), seed=1)
    out = check_step(fast, "positional")
    assert len(set(out.scales)) == 3 and all(m % 2 == 0 for m in out.scales)


def test_stage_one_all_queries_with_the_lm_frozen():
    ref, *_ = reference_step("positional", (M,))
    fast = patched(ref, num_tokens=(M,))
    for p in fast.model.language_model.parameters():
        p.requires_grad_(False)
    batch = make_batch(fast, [list(r) for r in ROWS], tokens_per_image=M)
    out = fast(**batch.inputs())
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), reference_step("positional", (M,))[2], rtol=1e-5, atol=0)
    conn, conn_ref = fast.model.query_abstractor, ref.model.query_abstractor
    for (name, p), q in zip(conn.named_parameters(), conn_ref.parameters()):
        if name == "ln_k.bias":  # analytically zero (assert_shift_grads_vanish)
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-4, atol=2e-4 * q.grad.abs().max().item(), msg=name)
    assert all(p.grad is None for p in fast.model.language_model.parameters())


@pytest.mark.parametrize(
    "num_tokens, match",
    [
        ((0, 4), r"token count 0 .* allowed: ints in 1\.\.16"),
        ((4, M + 1), r"token count 17"),
        ("all", r"num_tokens must be a tuple .* 'released' or \('random', k\), got 'all'"),
        (("random", 9), r"\('random', k\) needs an int k in 1\.\.8 .* got 9"),
        (("random", 0), r"needs an int k in 1\.\.8"),
    ],
)
def test_bad_num_tokens_refused(num_tokens, match):
    with pytest.raises(ValueError, match=match):
        fastnest.patch(build(), num_tokens=num_tokens)


def test_patch_llava_refuses_an_mqt_model():
    with pytest.raises(TypeError, match="model_type 'llava'.*'mqt_llava'"):
        fastnest.patch_llava(build())


def test_copies_keep_the_draw_and_unpatch_restores():
    model = fastnest.patch(build(), num_tokens="released", seed=4)
    twin = copy.deepcopy(model)
    assert [patch_state(twin).training_spec().scales for _ in range(10)] == [
        patch_state(model).training_spec().scales for _ in range(10)
    ]
    fixed = fastnest.patch(build(), num_tokens=(2, 5))
    assert patch_state(copy.deepcopy(fixed)).training_spec().scales == (2, 5)
    fastnest.unpatch(fixed)
    assert not fastnest.hf.is_patched(fixed) and "forward" not in fixed.__dict__
