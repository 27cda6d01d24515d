"""The LLaVA data path: v1 template, labels on assistant turns only, and every kind of bad row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastnest.packing import IGNORE_INDEX
from fastnest.train.data_llava import BadSampleError, BadSamples, Collator, LlavaJsonExamples, count_targets
from fastnest.train.data_synthetic import QUESTION_TYPES, SyntheticVQA, vocabulary
from fastnest.train.template import BadSample, encode_v1
from tests.train_helpers import row, tiny_processor, write_images, write_json

TPI = 16  # tokens per image of the tiny processor's 4x4 grid


def test_v1_template_labels_only_the_answers():
    tok = tiny_processor().tokenizer
    conv = [
        {"from": "human", "value": "<image>\nwhat colour is the background ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "what colour is the dot ?"},
        {"from": "gpt", "value": "blue"},
    ]
    enc = encode_v1(conv, tok, image_token_id=tok.image_token_id, tokens_per_image=TPI, system="A chat")
    words = tok.convert_ids_to_tokens(enc.input_ids.tolist())
    text = [w for w in words if w != "<image>"]
    assert text == (
        "<s> A chat USER: what colour is the background ? ASSISTANT: red </s> USER: what colour is the dot ? "
        "ASSISTANT: blue </s>".split()
    )
    assert words.count("<image>") == TPI and enc.num_images == 1
    labelled = [w for w, lab in zip(words, enc.labels.tolist()) if lab != IGNORE_INDEX]
    assert labelled == ["red", "</s>", "blue", "</s>"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc.labels.tolist(), enc.input_ids.tolist()))


@pytest.mark.parametrize(
    "conv, why",
    [
        ([], "non-empty list"),
        ([{"from": "gpt", "value": "x"}], 'turn 0 must be from "human"'),
        ([{"from": "human", "value": 3}], 'string "value"'),
    ],
)
def test_malformed_conversations_say_what_is_wrong(conv, why):
    tok = tiny_processor().tokenizer
    with pytest.raises(BadSample, match=why):
        encode_v1(conv, tok, image_token_id=tok.image_token_id, tokens_per_image=TPI)


def test_count_targets_counts_next_token_predictions():
    import torch

    labels = torch.tensor([[5, 6, -100, 7], [-100, 3, 4, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    # row 0: the first token (5) is predicted by nothing; row 1 (left padded): its first real token likewise
    assert count_targets(labels, mask) == 2 + 1


def _bad_rows(tmp_path):
    images = write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png at all")
    rows = [
        row(images[0]),  # 0 good
        row("missing.png"),  # 1 missing image
        row("corrupt.png"),  # 2 corrupt image (found when used)
        row([images[0], images[1]], question="what is the background ?"),  # 3 good, two images
        {"image": images[0], "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]},
        row(images[1], question=" ".join(["what"] * 80)),  # 5 over-long
        {"conversations": "nope"},  # 6 malformed
        row(None),  # 7 good, text only
    ]
    return write_json(tmp_path / "data.json", rows), tmp_path / "images"


def _load_all(data, folder, policy):
    bad = BadSamples(policy)
    examples = LlavaJsonExamples(data, folder, bad)
    collate = Collator(tiny_processor(), TPI, max_length=60, system="")
    batch = collate([examples.example(i, bad) for i in range(len(examples))], bad)
    return bad, batch


def test_bad_rows_are_skipped_with_file_row_and_reason(tmp_path, caplog):
    data, folder = _bad_rows(tmp_path)
    bad, batch = _load_all(data, folder, "skip")
    assert [w.rsplit(" ", 1)[1] for w in batch.where] == ["0", "3", "7"]
    assert dict(bad.counts) == {
        "missing image": 1,
        "corrupt image": 1,
        "image count mismatch": 1,
        "over-long row": 1,
        "malformed row": 1,
    }
    assert bad.summary().startswith("bad samples: 5 skipped")
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for r, why in [
        (1, "missing.png not found"),
        (2, "cannot be decoded"),
        (4, "0 <image> tag(s) but 1 image(s)"),
        (5, "exceed --max-length 60"),
        (6, '"conversations" must be a non-empty list'),
    ]:
        assert f"{data} row {r}: " in messages and why in messages
    assert batch.inputs["pixel_values"].shape == (3, 3, 8, 8)  # rows 0 and 3: three images


@pytest.mark.parametrize("first_bad", [1])
def test_bad_row_is_fatal_by_default(tmp_path, first_bad):
    data, folder = _bad_rows(tmp_path)
    with pytest.raises(BadSampleError, match=rf"{data} row {first_bad}: image .*missing.png not found"):
        _load_all(data, folder, "fail")


def test_lazy_problems_are_fatal_too(tmp_path):
    images = write_images(tmp_path / "images", 1)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG broken")
    data = write_json(tmp_path / "d.json", [row(images[0]), row("corrupt.png")])
    with pytest.raises(BadSampleError, match=rf"{data} row 1: image .*corrupt.png cannot be decoded"):
        _load_all(data, tmp_path / "images", "fail")
    data = write_json(tmp_path / "e.json", [row(images[0], question=" ".join(["what"] * 80))])
    with pytest.raises(BadSampleError, match=rf"{data} row 0: .* exceed --max-length 60"):
        _load_all(data, tmp_path / "images", "fail")


def test_malformed_json_names_file_line_and_column(tmp_path):
    data = tmp_path / "broken.json"
    data.write_text('[\n  {"conversations": []},\n  {oops}\n]')
    with pytest.raises(BadSampleError, match=r"broken.json: malformed JSON at line 3 column 4"):
        LlavaJsonExamples(data, tmp_path, BadSamples("skip"))


def test_malformed_jsonl_line_is_a_bad_row(tmp_path):
    images = write_images(tmp_path, 1)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row(images[0])) + "\n{broken\n" + json.dumps(row(images[0])) + "\n")
    bad = BadSamples("skip")
    assert len(LlavaJsonExamples(data, tmp_path, bad)) == 2 and dict(bad.counts) == {"malformed JSON": 1}
    with pytest.raises(BadSampleError, match=r"rows.jsonl row 1: malformed JSON"):
        LlavaJsonExamples(data, tmp_path, BadSamples("fail"))


def _patch_names(image):
    """The colour name of each 2-pixel patch, read back from the pixels (patches must be uniform)."""
    from fastnest.train.data_synthetic import BACKGROUNDS, PALETTES, UNIT

    palette = {tuple(v): k for k, v in (BACKGROUNDS | {c: v for p in PALETTES.values() for c, v in p.items()}).items()}
    px = image[::UNIT, ::UNIT]
    assert np.array_equal(np.repeat(np.repeat(px, UNIT, 0), UNIT, 1), image)  # patches are uniform
    return np.array([[palette[tuple(int(c) for c in p)] for p in r] for r in px])  # [24, 24]


def _pooled_tokens(names, scale):
    """Each token's colour histogram when the 24x24 patches are average-pooled to ``scale`` tokens, sorted: what
    a bag-of-tokens reading of the pooled image can see."""
    k = 24 // int(round(scale**0.5))
    blocks = names.reshape(24 // k, k, 24 // k, k).transpose(0, 2, 1, 3).reshape(-1, k * k)
    return sorted(tuple(zip(*np.unique(b, return_counts=True))) for b in blocks)


def test_synthetic_set_is_deterministic_and_answers_match_the_pixels():
    from fastnest.train.data_synthetic import PALETTES

    words = set(vocabulary())
    a, b = SyntheticVQA(40, seed=3), SyntheticVQA(40, seed=3)
    sides = {"regional": 8, "local": 4, "fine": 2}  # the object: an aligned square of one colour of its pair
    for i in range(40):
        s = a[i]
        assert np.array_equal(s.image, b[i].image) and s.questions == b[i].questions
        qtype, question, answer = s.questions[0]
        assert qtype == QUESTION_TYPES[i % 4] and set((question + " " + answer).split()) <= words
        names = _patch_names(s.image)
        if qtype == "global":
            values, counts = np.unique(names, return_counts=True)
            assert answer == values[counts.argmax()]  # the background covers most of the image
            continue
        side = sides[qtype]
        blocks = names.reshape(24 // side, side, 24 // side, side).transpose(0, 2, 1, 3).reshape(-1, side * side)
        filled = {str(blk[0]) for blk in blocks if blk[0] in PALETTES[qtype] and (blk == blk[0]).all()}
        assert filled == {answer}  # exactly one colour of the pair fills an aligned square of the object's side
    multi = SyntheticVQA(10, seed=0, turns=4)[0]
    assert sorted(t for t, _, _ in multi.questions) == sorted(QUESTION_TYPES)
    with pytest.raises(ValueError, match=r"turns must be in 1\.\.4 \(one question per type\), got 5"):
        SyntheticVQA(10, turns=5)


def test_synthetic_objects_differ_from_their_decoys_only_at_the_designed_scale():
    """Swapping an object's colour with its decoy's only permutes the pooled tokens at every scale but the
    object's designed one (no bag-of-tokens reading can tell them apart there); at the designed scale it does not."""
    from fastnest.train.data_synthetic import DESIGNED_SCALES, PALETTES

    data = SyntheticVQA(120, seed=11, turns=4)
    for i in range(len(data)):
        s = data[i]
        names = _patch_names(s.image)
        for qtype, _, answer in s.questions:
            if qtype == "global":
                continue
            (decoy,) = set(PALETTES[qtype]) - {answer}
            swapped = np.where(names == answer, decoy, np.where(names == decoy, answer, names))
            assert (names == answer).sum() == (names == decoy).sum() > 0
            for scale in (1, 9, 36, 144, 576):
                same = _pooled_tokens(names, scale) == _pooled_tokens(swapped, scale)
                assert same == (scale != DESIGNED_SCALES[qtype]), (i, qtype, scale)


def test_synthetic_curriculum_adds_decoys_over_the_stream():
    """Training (``curriculum=True``): no decoy in the first quarter of the stream (lone tiles 4-8 and dots 2-6
    patches wide), every decoy in the last quarter, about half in the middle; evaluation images hold them all."""
    from fastnest.train.data_synthetic import PALETTES

    def decoys(data, i):
        s, held = data[i], 0
        names = _patch_names(s.image)
        for qtype, _, answer in s.questions:
            if qtype != "global":
                held += int((names == (set(PALETTES[qtype]) - {answer}).pop()).any())
        return held

    n = 400
    train = SyntheticVQA(n, seed=2, turns=4, curriculum=True)
    assert all(decoys(train, i) == 0 for i in range(n // 4))
    assert all(decoys(train, i) == 3 for i in range(3 * n // 4, n))
    assert 0.3 < sum(decoys(train, i) for i in range(n // 4, 3 * n // 4)) / (n // 2 * 3) < 0.7
    evaluation = SyntheticVQA(40, seed=2, turns=4)
    assert all(decoys(evaluation, i) == 3 for i in range(40))
    for qtype, sides in (("local", {4, 6, 8}), ("fine", {2, 4, 6})):
        seen = set()
        for i in range(60):  # lone objects: one square of one colour of the pair
            names = _patch_names(train[i].image)
            cells = np.argwhere(np.isin(names, list(PALETTES[qtype])))
            side = int(np.ptp(cells[:, 0])) + 1
            assert len({str(names[tuple(p)]) for p in cells}) == 1 and len(cells) == side * side
            assert np.ptp(cells[:, 1]) + 1 == side
            seen.add(side)
        assert seen == sides, qtype
