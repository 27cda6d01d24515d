"""``evaluate`` (one packed multi-scale prefill per batch) gives the correctness matrix of the released workflow
(tools/released_eval.py: one padded pass per scale through the unpatched model, full logits)."""

from __future__ import annotations

import pytest
import torch

import fastnest
from fastnest.train.analyze import evaluate
from fastnest.train.data_llava import BadSamples, Collator, Example, SyntheticExamples
from tests.train_helpers import TINY_SCALES, tiny_model, tiny_processor
from tools.m3_reference import padded_labels, padded_logits, scaled_rows
from tools.released_eval import released_correct, released_evaluate

SYSTEM = "A chat"
TIE = 1e-3  # logits agree to ~1e-5 (tests/test_train_analyze.py); a top-2 gap below this may flip either way


class WithTextRow:
    """Synthetic examples, then one text-only row (its answer counts at every scale)."""

    def __init__(self, examples: SyntheticExamples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples) + 1

    def example(self, index: int, bad: BadSamples) -> Example:
        if index < len(self.examples):
            return self.examples.example(index, bad)
        conv = [{"from": "human", "value": "how many shapes are there ?"}, {"from": "gpt", "value": "two"}]
        return Example(conv, [], "text row")


@pytest.fixture(scope="module")
def trained():
    """The tiny model after 80 all-scale steps on the synthetic set: it answers some samples and not others."""
    processor = tiny_processor()
    model = fastnest.patch_llava(tiny_model(processor, seed=3), scales=TINY_SCALES)
    bad = BadSamples("fail")
    collate = Collator(processor, 16, max_length=200, system=SYSTEM)
    data = SyntheticExamples(256, seed=0, turns=1)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(80):
        batch = collate([data.example((step * 8 + i) % len(data), bad) for i in range(8)], bad)
        loss = model(**batch.inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    plain = tiny_model(processor).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain, processor


def _margins(plain, processor, examples, batch_size: int) -> torch.Tensor:
    """``[samples, scales]``: the smallest top-1 minus top-2 logit gap over the sample's labelled positions."""
    collate = Collator(processor, 16, max_length=200, system=SYSTEM)
    bad, out = BadSamples("fail"), []
    for first in range(0, len(examples), batch_size):
        batch = collate([examples.example(i, bad) for i in range(first, min(first + batch_size, len(examples)))], bad)
        columns = []
        for scale in TINY_SCALES:
            embeds, labels, _ = scaled_rows(plain, **batch.inputs, scale=scale)
            with torch.no_grad():
                top = padded_logits(plain, embeds)[:, :-1].topk(2, dim=-1).values
            gap = (top[..., 0] - top[..., 1]).masked_fill(padded_labels(labels)[:, 1:] == -100, float("inf"))
            columns.append(gap.min(dim=1).values)
        out.append(torch.stack(columns, dim=1))
    return torch.cat(out)


def test_evaluate_gives_the_released_workflows_correctness_matrix(trained):
    model, plain, processor = trained
    examples = WithTextRow(SyntheticExamples(47, seed=7, turns=2))  # two answers per sample: both must match
    options = dict(batch_size=16, max_length=200, system=SYSTEM, bad=BadSamples("fail"))
    ours = evaluate(model, processor, examples, **options).correct
    released = released_evaluate(plain, processor, examples, **options, scales=TINY_SCALES)
    decisive = _margins(plain, processor, examples, 16) > TIE
    assert ours.shape == released.shape == (48, len(TINY_SCALES))
    assert decisive.float().mean() > 0.9  # nearly every entry is compared
    assert torch.equal(ours[decisive], released[decisive])
    # not a vacuous agreement: the model answers some samples and fails others
    assert 0 < int(released[decisive].sum()) < int(decisive.sum())
    assert released[-1].all() == released[-1].any()  # the text-only row: one answer for every scale
    # one data pass per scale (as released) and one pass running every scale per batch: the same passes
    shared = released_evaluate(plain, processor, examples, **options, scales=TINY_SCALES, shared_batches=True)
    assert torch.equal(shared, released)


def test_released_correct_is_exact_match_of_every_labelled_token():
    """Answers relabelled with the largest scale's own argmax: that scale is right on every row, each other
    scale exactly where its argmax agrees at every answer position."""
    processor = tiny_processor()
    plain = tiny_model(processor, seed=1).eval()
    bad = BadSamples("fail")
    batch = Collator(processor, 16, max_length=200, system=SYSTEM)(
        [SyntheticExamples(2, seed=5, turns=1).example(i, bad) for i in range(2)], bad
    )
    inputs = dict(batch.inputs)
    per_scale = []
    for scale in TINY_SCALES:
        embeds, labels, _ = scaled_rows(plain, **inputs, scale=scale)
        with torch.no_grad():
            predicted = padded_logits(plain, embeds)[:, :-1].argmax(-1)
        per_scale.append((padded_labels(labels)[:, 1:], predicted))
    # relabel every answer position with the 16-token scale's own prediction: that scale is right everywhere
    target, predicted = per_scale[-1]
    labels = inputs["labels"].clone()
    for b in range(2):
        where = (target[b] != -100).nonzero().squeeze(1)
        full = (inputs["labels"][b] != -100).nonzero().squeeze(1)
        assert len(where) == len(full) > 0
        labels[b, full] = predicted[b, where]
    got = released_correct(plain, inputs["input_ids"], inputs["attention_mask"], labels, inputs["pixel_values"],
                           scales=TINY_SCALES)  # fmt: skip
    for k, (t, p) in enumerate(per_scale):
        for b in range(2):
            where = (t[b] != -100).nonzero().squeeze(1)
            full = (inputs["labels"][b] != -100).nonzero().squeeze(1)
            expected = torch.equal(p[b, where], labels[b, full])
            assert bool(got[b, k]) == expected
    assert got[:, -1].all()
    with pytest.raises(ValueError, match="row 0: no labelled answer token"):
        released_correct(plain, inputs["input_ids"], inputs["attention_mask"], torch.full_like(labels, -100),
                         inputs["pixel_values"], scales=TINY_SCALES)  # fmt: skip
