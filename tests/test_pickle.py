"""A patched model pickles (``torch.save(model)``, spawned workers) wherever its plain twin does, and comes back
patched: the training loss against the released objective, inference and generate as before the round trip, and
``unpatch`` still restoring Hugging Face's own behaviour."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fastnest
from fastnest.hf.state import patch_state
from fastnest.hf.tiny import tiny_llava, tiny_llava_next, tiny_mqt_llava
from tools.batches import IMG, make_anyres_batch, make_batch
from tools.m3_reference import released_m3_loss
from tools.mqt_reference import released_mqt_loss
from tools.next_reference import released_next_loss

SCALES = (1, 9, 36, 144, 576)
ROWS = [[6, IMG, 9], [4, IMG, 12]]
COUNTS = (2, 4, 16)


def pickles(model) -> bool:
    try:
        torch.save(model, io.BytesIO())
    except (AttributeError, pickle.PicklingError):  # Python 3.11 names a local object by AttributeError
        return False
    return True


def round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# family -> (a tiny model, its batch, the patch, the released objective's loss)
FAMILIES = {
    "llava": (
        lambda: tiny_llava(grid=24, vision_hidden=32, vision_layers=1, hidden=64, layers=2, heads=4, vocab=384),
        lambda m: make_batch(m, ROWS).inputs(),
        lambda m: fastnest.patch_llava(m, scales=SCALES),
        lambda m, batch: released_m3_loss(m, **batch, scales=SCALES)[0],
    ),
    "llava-next": (
        lambda: tiny_llava_next(vision_layers=1, hidden=64, layers=2, vocab=384),
        lambda m: make_anyres_batch(m, ROWS, [(99, 176), (48, 48)]),
        lambda m: fastnest.patch_llava_next(m, scales=SCALES),
        lambda m, batch: released_next_loss(m, **batch, scales=SCALES)[0],
    ),
    "mqt": (
        lambda: tiny_mqt_llava(num_queries=16),
        lambda m: make_batch(m, ROWS, tokens_per_image=16).inputs(),
        lambda m: fastnest.patch(m, num_tokens=COUNTS),
        lambda m, batch: released_mqt_loss(m, **batch, counts=COUNTS)[0],
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_pickled_patched_model_comes_back_patched(family):
    build, make_inputs, patch, released_loss = FAMILIES[family]
    torch.manual_seed(0)
    plain = build()
    batch = make_inputs(plain)
    # before any call: from its first call on, a transformers 5 model holds output-capturing hooks that are local
    # functions, and pickles no more, patched or not
    fast = patch(copy.deepcopy(plain))
    loaded = round_trip(fast)
    released = released_loss(plain, batch)
    assert fastnest.hf.is_patched(loaded) and patch_state(loaded).spec == patch_state(fast).spec
    assert loaded.forward.__self__ is loaded and loaded.generate.__self__ is loaded
    torch.testing.assert_close(loaded(**batch).loss, released, rtol=1e-5, atol=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    scale = patch_state(fast).spec.scales[1]
    loaded.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, scale=scale).logits, fast(**inputs, scale=scale).logits)
        kwargs = dict(max_new_tokens=3, do_sample=False, scale=scale)
        assert torch.equal(loaded.generate(**inputs, **kwargs), fast.generate(**inputs, **kwargs))
    assert pickles(loaded) == pickles(plain)  # both called by now (transformers 5.0: both pickle; 5.24: neither)
    fastnest.unpatch(loaded)
    assert "forward" not in loaded.__dict__ and not fastnest.hf.is_patched(loaded)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, plain(**inputs).logits)


def test_a_draw_pickles_at_its_place():
    torch.manual_seed(0)
    fast = fastnest.patch_llava(tiny_llava(grid=6), scales=(1, 9, 36), sampling="random", seed=3)
    patch_state(fast).training_spec()
    loaded = round_trip(fast)
    drawn = [patch_state(fast).training_spec().scales for _ in range(8)]
    assert [patch_state(loaded).training_spec().scales for _ in range(8)] == drawn
