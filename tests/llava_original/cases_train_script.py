"""README's worked example, end to end: examples/llava_original/train_m3.py over the original code's own
``llava.train.train.train()`` (its argument parser, tokenizer loading, vision-module set-up, lazy dataset,
collator and LLaVATrainer) on a tiny saved model, a byte-level tokenizer and four images. The first step's
loss is the released M3 loss of that step's batch on the weights before it."""

from __future__ import annotations

import copy
import json
import runpy

import pytest
import torch
from PIL import Image

from tests.llava_original.common import GRID, PATCH, VOCAB, fastnest_llava
from tools.llava_original import released_m3_loss, tiny_original_llava

SCRIPT = "examples/llava_original/train_m3.py"
SCALES = (1, 36, 576)


def _byte_tokenizer(directory) -> None:
    """A GPT-2 (slow, byte-level) tokenizer: one token per byte, ``<|endoftext|>`` (also pad) = 256."""
    from transformers import GPT2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    GPT2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)


def _data(directory) -> None:
    """Four image captions in LLaVA's conversation format (the 'plain' template of its pretraining stage)."""
    images = directory / "images"
    images.mkdir()
    rows = []
    for i, (colour, shape) in enumerate(
        [("red", (48, 48)), ("green", (60, 40)), ("blue", (30, 50)), ("white", (48, 48))]
    ):
        Image.new("RGB", shape, colour).save(images / f"{i}.png")
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    (directory / "data.json").write_text(json.dumps(rows))


def test_readme_example_trains_with_the_packed_step(tmp_path, monkeypatch):
    from llava.train import train as llava_train

    model_dir, tower_dir = tmp_path / "model", tmp_path / "tower"
    tiny_original_llava(tower_dir, grid=GRID, patch=PATCH, vocab=VOCAB).save_pretrained(model_dir)
    _byte_tokenizer(model_dir)
    _data(tmp_path)
    steps = []
    own_step = fastnest_llava.training_step

    def recording_step(model, input_ids, attention_mask, labels, images):
        before = copy.deepcopy(model) if not steps else None  # the weights the first step starts from
        out = own_step(model, input_ids, attention_mask, labels, images)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images}
        steps.append((before, batch, out.loss.detach(), out.scale_losses))
        return out

    monkeypatch.setattr(fastnest_llava, "training_step", recording_step)
    monkeypatch.setattr(llava_train, "LLaVATrainer", llava_train.LLaVATrainer)  # restored after the test
    args = ["--model_name_or_path", model_dir, "--version", "plain", "--vision_tower", tower_dir]
    args += ["--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False"]
    args += ["--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--data_path", tmp_path / "data.json"]
    args += ["--image_folder", tmp_path / "images", "--lazy_preprocess", "True", "--output_dir", tmp_path / "out"]
    args += [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
    ]
    args += ["--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0"]
    args += ["--model_max_length", "2048", "--matryoshka_vis_token_scale", ",".join(map(str, SCALES))]
    monkeypatch.setattr("sys.argv", [SCRIPT, *map(str, args)])
    runpy.run_path(SCRIPT)  # defines M3Trainer and puts it in train.py's module
    llava_train.train()  # what the script's __main__ runs (there with flash_attention_2)

    assert len(steps) == 2
    before, batch, loss, per_scale = steps[0]
    assert batch["images"].shape == (2, 3, GRID * PATCH, GRID * PATCH) and (batch["labels"] != -100).any()
    fastnest_llava.unpatch(before)
    with torch.no_grad():
        want, want_per_scale = released_m3_loss(before, batch, SCALES)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_scale, want_per_scale, rtol=1e-5, atol=0)
    logged = [
        e["loss"]
        for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
        if "loss" in e
    ]
    assert logged == pytest.approx([round(float(s[2]), 4) for s in steps], abs=1e-4)  # the Trainer trained on it
