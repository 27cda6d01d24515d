"""``fastnest train --arch llava-next`` and ``fastnest analyze`` of a LLaVA-NeXT (anyres), through the CLI, against
plain re-statements: batches from ``LlavaNextProcessor`` itself (its placeholder counts, crops and image sizes),
the released M3 LLaVA-NeXT objective (tools/next_reference.py) and teacher-forced greedy correctness per scale."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import fastnest
from fastnest.train.cli import main
from fastnest.train.data_llava import SyntheticExamples
from fastnest.train.model import default_next_model_and_processor
from fastnest.train.run_analysis import SYNTHETIC_EVAL_SEED
from fastnest.train.template import SYSTEM_V1
from fastnest.train.update import with_dummy_row
from tests.train_helpers import records, save_tiny_model
from tools.next_reference import released_next_loss, scaled_rows

SCALES = (1, 9, 144)
BATCH = 2
TYPES = ("global", "regional", "local", "fine")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("next") / "run"
    argv = ["train", "--arch", "llava-next", "--output-dir", str(run), "--steps", "2", "--batch-size", str(BATCH)]
    argv += ["--synthetic-turns", "1", "--scales", ",".join(map(str, SCALES)), "--device", "cpu", "--no-progress"]
    assert main([*argv, "--no-analyze"]) == 0
    return run


def processor_batch(processor, samples) -> dict:
    """The v1 template written out as text, expanded by the processor itself; labels on answers and </s>."""
    texts = []
    for s in samples:
        (_, question, answer) = s.questions[0]
        texts.append(f"<s> {SYSTEM_V1} USER: <image> {question} ASSISTANT: {answer} </s>")
    batch = dict(processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt"))
    labels = torch.full_like(batch["input_ids"], -100)
    for b, s in enumerate(samples):
        n = len(s.questions[0][2].split()) + 1  # the answer's words and </s>, at the end of the row
        cols = batch["attention_mask"][b].nonzero().squeeze(1)[-n:]
        labels[b, cols] = batch["input_ids"][b, cols]
    return {**batch, "labels": labels}


def test_built_in_next_step_one_loss_is_the_released_objective(run_dir):
    """The logged step-1 loss of the built-in LLaVA-NeXT is the released M3 objective over the anyres arrangement
    on that step's rows (the synthetic set's first rows), from the initial weights."""
    model, processor = default_next_model_and_processor(seed=0)
    assert model.config.model_type == "llava_next"
    data = SyntheticExamples(2 * BATCH, seed=0, turns=1, curriculum=True).data  # the 2-step run's training stream
    batch = processor_batch(processor, [data[i] for i in range(BATCH)])
    assert batch["pixel_values"].shape[:2] == (BATCH, 3)  # a square image: the base crop and a 1x2 grid
    with torch.no_grad():
        loss, per_scale = released_next_loss(model.train(), **batch, scales=SCALES)
    first = records(run_dir)[0]
    assert first["step"] == 1 and set(first["scale_losses"]) == {str(s) for s in SCALES}
    assert first["loss"] == pytest.approx(float(loss), rel=1e-5)
    for s, value in zip(SCALES, per_scale.tolist()):
        assert first["scale_losses"][str(s)] == pytest.approx(value, rel=1e-5)
    assert json.loads((run_dir / "model" / "config.json").read_text())["model_type"] == "llava_next"


def reference_correct(model, processor, sample, scale: int) -> bool:
    """Teacher-forced greedy exact match at ``scale``: the unpatched model on the reference arrangement."""
    batch = processor_batch(processor, [sample])
    embeds, labels = scaled_rows(model, **batch, scale=scale)
    hidden = model.model.language_model(inputs_embeds=embeds[0][None], use_cache=False).last_hidden_state
    predicted = model.lm_head(hidden[0]).argmax(-1)
    at = (labels[0] != -100).nonzero().squeeze(1)
    return bool((predicted[at - 1] == labels[0][at]).all())


def test_analyze_of_the_saved_next_run_matches_a_plain_computation(run_dir, tmp_path):
    """``fastnest analyze`` on the run: one sample per question type, so each type's accuracy at a scale is that
    sample's teacher-forced correctness, computed here on the unpatched checkpoint."""
    out = tmp_path / "report"
    assert (
        main(["analyze", "--model", str(run_dir), "--samples", "4", "--output-dir", str(out), "--device", "cpu"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["scales"] == list(SCALES) and report["num_samples"] == 4
    # a scale is each crop's pooled tokens: an image's count also depends on its crops, so the axis says per crop
    assert report["scale_unit"] == "visual tokens per crop"
    assert "| visual tokens per crop | " in (out / "report.md").read_text()
    model = LlavaNextForConditionalGeneration.from_pretrained(run_dir / "model").eval()
    processor = AutoProcessor.from_pretrained(run_dir / "model")
    data = SyntheticExamples(4, seed=SYNTHETIC_EVAL_SEED, turns=1).data
    assert sorted(data[i].question_type for i in range(4)) == sorted(TYPES)
    with torch.no_grad():
        for i in range(4):
            sample = data[i]
            accuracy = report["types"][sample.question_type]["accuracy"]
            assert report["types"][sample.question_type]["n"] == 1
            for s in SCALES:
                assert accuracy[str(s)] == float(reference_correct(model, processor, sample, s)), (i, s)


def test_model_dir_of_a_next_checkpoint_trains_and_arch_must_agree(run_dir, tmp_path, capsys):
    """--model with a llava_next directory trains (patched as LLaVA-NeXT); --arch naming another family is
    refused with the fix, as is --arch with --connector mqt."""
    common = ["--steps", "1", "--batch-size", "1", "--synthetic-turns", "1", "--device", "cpu", "--no-progress"]
    common += ["--no-analyze", "--scales", "1,9"]
    model = str(run_dir / "model")
    assert main(["train", "--model", model, "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert set(records(tmp_path / "a")[0]["scale_losses"]) == {"1", "9"}
    args = ["train", "--model", model, "--arch", "llava", "--output-dir", str(tmp_path / "b"), *common]
    assert main(args) == 2
    assert "is a 'llava_next' model, not --arch llava: drop --arch" in capsys.readouterr().err
    llava = str(save_tiny_model(tmp_path / "llava"))
    args = ["train", "--model", llava, "--arch", "llava-next", "--output-dir", str(tmp_path / "c"), *common]
    assert main(args) == 2
    assert "is a 'llava' model, not --arch llava-next" in capsys.readouterr().err
    assert main(["train", "--connector", "mqt", "--arch", "llava-next", "--output-dir", str(tmp_path / "d")]) == 2
    assert "--arch llava-next is an option of --connector pooled" in capsys.readouterr().err


def test_resume_keeps_the_arch(run_dir, capsys):
    """--arch is part of the run's trajectory: resuming the NeXT run without it is refused, naming it."""
    argv = ["train", "--output-dir", str(run_dir), "--steps", "2", "--batch-size", str(BATCH), "--synthetic-turns", "1"]
    argv += ["--scales", ",".join(map(str, SCALES)), "--device", "cpu", "--no-progress", "--no-analyze"]
    assert main([*argv, "--resume", str(run_dir)]) == 2
    assert "--arch: checkpoint 'llava-next', now None" in capsys.readouterr().err


def test_dummy_row_keeps_image_sizes_and_changes_nothing():
    """A text-only micro-batch plus the NeXT dummy row (DDP/FSDP2): the dummy's crops and image_sizes reach the
    model, which runs them (tower and image_newline get gradients) without changing the loss or a gradient."""
    model, processor = default_next_model_and_processor(seed=5)
    model = fastnest.patch(model, scales=SCALES).train()
    tok = processor.tokenizer
    ids = torch.tensor([tok("USER: what colour is the dot ? ASSISTANT: blue </s>")["input_ids"]] * 2)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    dummy = fastnest.patch_state(model).adapter.dummy_row(model)
    merged = with_dummy_row(inputs, dummy)
    assert torch.equal(merged["image_sizes"], dummy["image_sizes"])
    assert torch.equal(merged["pixel_values"], dummy["pixel_values"])
    grads = []
    for batch in (inputs, merged):
        model.zero_grad()
        out = model(**batch, num_items_in_batch=4)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        grads[-1]["loss"] = out.loss.detach()
    assert grads[1]["model.image_newline"] is not None
    patch = [n for n in grads[1] if "patch_embedding" in n]  # the tower's path differs across transformers 5.x
    assert patch and all(grads[1][n] is not None for n in patch)
    for name, g in grads[0].items():
        other = grads[1][name]
        if g is None:
            assert other is None or not other.any(), name
        else:
            torch.testing.assert_close(other, g, rtol=1e-5, atol=1e-7, msg=name)
