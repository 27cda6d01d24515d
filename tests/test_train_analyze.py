"""Analysis: one packed multi-scale prefill gives each scale's logits; scoring = greedy exact match; oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastnest
from fastnest.train import report
from fastnest.train.analyze import Scores, score_batch, summarize
from fastnest.train.data_llava import BadSamples, Batch, Collator, SyntheticExamples
from fastnest.train.prefill import multiscale_logits
from tests.train_helpers import TINY_SCALES, tiny_model, tiny_processor
from tools.m3_reference import scaled_rows


def _batch(processor, n=3):
    examples = SyntheticExamples(n, seed=5, turns=2)
    bad = BadSamples("fail")
    batch = Collator(processor, 16, max_length=200, system="A chat")([examples.example(i, bad) for i in range(n)], bad)
    text_only = Collator(processor, 16, max_length=200, system="A chat")
    # one text-only row (no image): its answer is shared by every scale
    conv = [{"from": "human", "value": "what colour is the dot ?"}, {"from": "gpt", "value": "blue"}]
    from fastnest.train.data_llava import Example

    extra = text_only([Example(conv, [], "text row")], bad)
    width = max(batch.inputs["input_ids"].shape[1], extra.inputs["input_ids"].shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    inputs = {
        k: torch.cat([pad(batch.inputs[k], v), pad(extra.inputs[k], v)])
        for k, v in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }
    inputs["pixel_values"] = batch.inputs["pixel_values"]
    return Batch(inputs, batch.question_types + ["text"], batch.where + ["text row"])


def test_packed_prefill_matches_each_scale_run_separately():
    processor = tiny_processor()
    ref = tiny_model(processor, seed=1).eval()
    model = fastnest.patch_llava(copy.deepcopy(ref), scales=TINY_SCALES).eval()
    batch = _batch(processor)
    out = multiscale_logits(model, **batch.inputs)
    assert set(out.scale_index.tolist()) == {-1, 0, 1, 2}
    for k, scale in enumerate(TINY_SCALES):
        embeds, labels, _ = scaled_rows(ref, **batch.inputs, scale=scale)
        for b, (emb, lab) in enumerate(zip(embeds, labels)):
            with torch.no_grad():
                hidden = ref.model.language_model(inputs_embeds=emb[None], use_cache=False).last_hidden_state[0]
                logits = ref.lm_head(hidden).float()
            where = (lab[1:] != -100).nonzero().squeeze(1)  # position p predicts label p+1
            text_only = b == len(embeds) - 1
            pick = (out.row == b) & (out.scale_index == (-1 if text_only else k))
            assert int(pick.sum()) == len(where) > 0
            torch.testing.assert_close(out.logits[pick], logits[where], rtol=1e-4, atol=1e-5)
            assert torch.equal(out.targets[pick], lab[1:][where])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_prefill_runs_the_patch_attention_backend(monkeypatch):
    """The analysis shares the training step's packed pass: the backend the patch names runs it (flex runs its
    forward on CPU), with the same logits as sdpa."""
    import fastnest.attention.flex

    processor = tiny_processor()
    batch = _batch(processor)
    base = tiny_model(processor, seed=1).eval()
    sdpa = multiscale_logits(fastnest.patch_llava(copy.deepcopy(base), scales=TINY_SCALES), **batch.inputs)
    calls = []
    attend = fastnest.attention.flex.attend
    monkeypatch.setattr(fastnest.attention.flex, "attend", lambda *a: calls.append(a[3].backend) or attend(*a))
    flex = fastnest.patch_llava(copy.deepcopy(base), scales=TINY_SCALES, attention="flex")
    out = multiscale_logits(flex, **batch.inputs)
    assert calls and set(calls) == {"flex"}  # every layer's packed attention
    torch.testing.assert_close(out.logits, sdpa.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.targets, sdpa.targets) and torch.equal(out.row, sdpa.row)


def test_score_is_greedy_decoding_exact_match():
    processor = tiny_processor()
    torch.manual_seed(0)
    model = fastnest.patch_llava(tiny_model(processor, seed=2), scales=TINY_SCALES).eval()
    prompt = _batch(processor, n=4)
    # Answers = what greedy decoding produces at scale 4, so scale 4 must score every row as correct and the
    # other scales exactly where their own greedy decoding agrees.
    rows, answers = [], []
    for b in range(4):
        mask = prompt.inputs["attention_mask"][b].bool()
        labels = prompt.inputs["labels"][b][mask]
        first_label = int((labels != -100).nonzero()[0])
        ids = prompt.inputs["input_ids"][b][mask][:first_label]
        rows.append(ids)
    pv = prompt.inputs["pixel_values"]
    greedy = {}
    for scale in TINY_SCALES:
        outs = []
        for b, ids in enumerate(rows):
            gen = model.generate(
                input_ids=ids[None],
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values=pv[b : b + 1],
                scale=scale,
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            outs.append(gen[0, len(ids) :])
        greedy[scale] = outs
    answers = greedy[4]
    width = max(len(r) + 2 for r in rows)
    input_ids = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    mask = torch.zeros(4, width, dtype=torch.long)
    for b, (ids, ans) in enumerate(zip(rows, answers)):
        n = len(ids)
        input_ids[b, : n + 2] = torch.cat([ids, ans])
        labels[b, n : n + 2] = ans
        mask[b, : n + 2] = 1
    batch = Batch(
        {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pv},
        ["x"] * 4,
        [f"row {b}" for b in range(4)],
    )
    correct = score_batch(model, batch)
    expected = torch.tensor([[torch.equal(greedy[s][b], answers[b]) for s in TINY_SCALES] for b in range(4)])
    assert correct[:, 1].all()
    assert torch.equal(correct, expected)


def test_summary_oracle_and_report(tmp_path):
    scales = (1, 9, 36)
    correct = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    types = ["a", "a", "b", "b", "a", "b"]
    s = summarize(Scores(scales, correct, types, prefill_passes=2, seconds=1.0), type_order=["b", "a"])
    assert list(s["types"]) == ["b", "a"]
    assert s["all"]["accuracy"] == {"1": 2 / 6, "9": 3 / 6, "36": 3 / 6}
    assert s["all"]["oracle_accuracy"] == 5 / 6
    # fewest tokens per sample: 1, 9, 36, (none -> 1, as the M3 authors count it), 1, 9
    assert s["all"]["oracle_mean_tokens"] == pytest.approx((1 + 9 + 36 + 1 + 1 + 9) / 6)
    assert (
        s["types"]["a"]["accuracy"] == {"1": 2 / 3, "9": 2 / 3, "36": 2 / 3} and s["types"]["a"]["oracle_accuracy"] == 1
    )
    assert s["types"]["b"]["oracle_mean_tokens"] == pytest.approx((36 + 1 + 9) / 3)
    assert s["best_single_scale"] == 9 and s["oracle_unanswered"] == "smallest"
    largest = summarize(Scores(scales, correct, types, 2, 1.0), type_order=["b", "a"], unanswered="largest")
    assert largest["all"]["oracle_mean_tokens"] == pytest.approx((1 + 9 + 36 + 36 + 1 + 9) / 6)
    assert largest["types"]["b"]["oracle_mean_tokens"] == pytest.approx((36 + 36 + 9) / 3)
    assert largest["all"]["oracle_accuracy"] == s["all"]["oracle_accuracy"]
    assert "largest" in largest["oracle_definition"] and "authors" in s["oracle_definition"]
    with pytest.raises(ValueError, match="unanswered must be one of .*'median'"):
        summarize(Scores(scales, correct, types, 2, 1.0), unanswered="median")
    paths = report.write(s, tmp_path)
    assert json.loads(paths["json"].read_text()) == s
    md = paths["md"].read_text()
    assert (
        "| 9 | 33.3 | 66.7 | 50.0 |" in md and "| oracle (mean tokens) | 66.7 (15.3) | 100.0 (3.7) | 83.3 (9.5) |" in md
    )
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size == (760, 480)


def test_granularity_is_the_fewest_tokens_within_two_points_of_the_best(tmp_path):
    from fastnest.train.analyze import granularity

    assert granularity({"1": 0.5, "9": 0.98, "36": 0.99, "144": 1.0}) == 9  # 98 is within 2 points of 100
    assert granularity({"1": 0.5, "9": 0.97, "36": 0.98, "144": 1.0}) == 36  # 97 is not
    assert granularity({"1": 0.5, "9": 0.97, "36": 0.99, "144": 0.975}) == 9  # the best need not be the largest
    assert granularity({"1": 0.5, "9": 0.979, "36": 1.0}) == 36  # 2.1 points below: not enough
    assert granularity({"576": 0.3, "1": 0.3}) == 1 and granularity({}) is None
    # 100 samples of one type: 1 token answers 40, 9 tokens 99, 36 and 144 all of them
    correct = torch.zeros(100, 4, dtype=torch.bool)
    correct[:40, 0], correct[:99, 1], correct[:, 2:] = True, True, True
    s = summarize(Scores((1, 9, 36, 144), correct, ["t"] * 100, 1, 1.0), designed={"t": 9, "absent": 1})
    assert s["types"]["t"]["granularity"] == 9 and s["types"]["t"]["designed_granularity"] == 9
    assert list(s["types"]) == ["t"] and "designed_granularity" not in s["all"]
    md = report.write(s, tmp_path)["md"].read_text()
    assert "| granularity: measured (designed) | 9 (9) | 9 |" in md
    assert md.splitlines()[2].startswith("| visual tokens | ") and s["scale_unit"] == "visual tokens"
    plain = report.markdown(summarize(Scores((1, 9, 36, 144), correct, ["t"] * 100, 1, 1.0)))
    assert "| granularity: measured | 9 | 9 |" in plain and "designed" not in plain
