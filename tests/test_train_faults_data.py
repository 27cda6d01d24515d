"""Bad input found when the data is read: images of any shape and mode decoded right, ``<image>`` only in user
turns, at least one answer per row, non-UTF-8 bytes; evaluation data checked before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastnest.train.cli import main
from fastnest.train.data_llava import BadSampleError, BadSamples, Collator, LlavaJsonExamples
from tests.train_helpers import cli_args, row, save_tiny_model, tiny_processor, write_images, write_json

CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _pixels(tmp_path, image: Image.Image) -> torch.Tensor:
    """``pixel_values`` of one row whose image file is ``image``, through the training data path."""
    image.save(tmp_path / "im.png")
    data = write_json(tmp_path / "d.json", [row("im.png")])
    bad = BadSamples("fail")
    example = LlavaJsonExamples(data, tmp_path, bad).example(0, bad)
    return Collator(tiny_processor(), 16, 200, "A chat")([example], bad).inputs["pixel_values"]


@pytest.mark.parametrize("height, width", [(1, 40), (40, 1), (3, 40), (4, 40), (40, 3), (3, 3)])
def test_images_of_any_shape_keep_their_colour(tmp_path, height, width):
    red = np.zeros((height, width, 3), np.uint8)
    red[..., 0] = 255
    means = _pixels(tmp_path, Image.fromarray(red))[0].mean(dim=(1, 2)).double().numpy()
    np.testing.assert_allclose(means, (np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD, atol=1e-3)


@pytest.mark.parametrize(
    "image, rgb",
    [
        (Image.fromarray(np.full((6, 9), 32896, np.uint16)), (128, 128, 128)),  # 16-bit grey: scaled, not clipped
        (Image.fromarray(np.full((6, 9, 4), [0, 0, 255, 255], np.uint8), "RGBA"), (0, 0, 255)),
        (Image.fromarray(np.full((6, 9), 64, np.uint8), "L"), (64, 64, 64)),
        (Image.fromarray(np.full((6, 9, 3), [0, 255, 0], np.uint8)).convert("P"), (0, 255, 0)),
    ],
)
def test_images_of_any_mode_are_decoded_to_their_rgb(tmp_path, image, rgb):
    means = _pixels(tmp_path, image)[0].mean(dim=(1, 2)).double().numpy()
    np.testing.assert_allclose(means, (np.array(rgb) / 255 - CLIP_MEAN) / CLIP_STD, atol=1e-2)


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def _faulty_rows(tmp_path):
    names = write_images(tmp_path / "img", 2)
    return [
        row(names[0]),  # 0 good
        {"image": names[0], "conversations": _conv("what is it ?", "<image> a square")},  # 1 tag in the answer
        {"conversations": _conv("what colour is the background ?")},  # 2 no answer
        row(names[1]),  # 3 good
    ]


def test_image_tag_in_an_answer_and_a_row_without_answer_are_bad_rows_when_read(tmp_path):
    data = write_json(tmp_path / "d.json", _faulty_rows(tmp_path))
    bad = BadSamples("skip")
    examples = LlavaJsonExamples(data, tmp_path / "img", bad)
    assert [r[0] for r in examples.rows] == [0, 3]
    assert bad.counts == {"image tag in an assistant turn": 1, "no assistant turn": 1}
    with pytest.raises(BadSampleError, match=rf"{data} row 1: turn 1 \(gpt\) holds <image>: images go in human"):
        LlavaJsonExamples(data, tmp_path / "img", BadSamples("fail"))


def test_training_with_skip_runs_past_those_rows_and_counts_them(tmp_path, tiny_dir):
    data = write_json(tmp_path / "d.json", _faulty_rows(tmp_path))
    args = ["--data", str(data), "--image-folder", str(tmp_path / "img"), "--on-bad-sample", "skip"]
    assert main(["train", *cli_args(tiny_dir, tmp_path / "run", 2, 2, *args)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_samples"] == {"image tag in an assistant turn": 1, "no assistant turn": 1}


def test_a_file_of_rows_without_answers_does_not_train(tmp_path, tiny_dir, capsys):
    data = write_json(tmp_path / "d.json", [{"conversations": _conv("hello ?")}] * 3)
    args = ["--data", str(data), "--on-bad-sample", "skip"]
    assert main(["train", *cli_args(tiny_dir, tmp_path / "run", 2, 2, *args)]) == 2
    assert f"--data {data}: no usable rows" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_non_utf8_is_one_bad_row_in_jsonl_and_fatal_with_its_offset_in_json(tmp_path):
    names = write_images(tmp_path, 1)
    good = json.dumps(row(names[0])).encode()
    broken = b'{"conversations": "caf\xff"}'
    lines = tmp_path / "d.jsonl"
    lines.write_bytes(good + b"\n" + broken + b"\n" + good + b"\n")
    bad = BadSamples("skip")
    assert [r[0] for r in LlavaJsonExamples(lines, tmp_path, bad).rows] == [0, 2]
    assert bad.counts == {"not UTF-8": 1}
    offset = len(good) + 1 + broken.index(b"\xff")
    with pytest.raises(BadSampleError, match=rf"{lines} row 1: not UTF-8 at byte {offset} of the file"):
        LlavaJsonExamples(lines, tmp_path, BadSamples("fail"))
    array = tmp_path / "d.json"
    array.write_bytes(b"[" + good + b", " + broken + b"]")
    at = 1 + len(good) + 2 + broken.index(b"\xff")
    with pytest.raises(BadSampleError, match=rf"{array}: not UTF-8 at byte {at} "):
        LlavaJsonExamples(array, tmp_path, BadSamples("skip"))


@pytest.mark.parametrize("case", ["bad row", "no rows"])
def test_evaluation_data_is_checked_before_training(tmp_path, tiny_dir, capsys, case):
    names = write_images(tmp_path / "img", 1)
    rows = [row(names[0]), row("missing.png")] if case == "bad row" else []
    evaluation = write_json(tmp_path / "eval.json", rows)
    args = [a for a in cli_args(tiny_dir, tmp_path / "run", 2, 2) if a != "--no-analyze"]
    args += ["--eval-data", str(evaluation), "--eval-image-folder", str(tmp_path / "img")]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert (
        (f"{evaluation} row 1: image" in err) if case == "bad row" else (f"--eval-data {evaluation}: no usable" in err)
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no training time spent
