"""``fastnest train``: the run directory, exact resume, accumulation, per-part learning rates and freezing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import fastnest
from fastnest.train import checkpoint
from fastnest.train.cli import main
from fastnest.train.trainer import TrainConfig, train
from tests.train_helpers import TINY_SCALES, save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _cfg(tmp_path, tiny_dir, name="run", **kw):
    return tiny_config(
        tmp_path / name, tiny_dir, **({"steps": 4, "batch_size": 2, "eval_samples": 8, "eval_batch_size": 8} | kw)
    )


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_command_writes_a_loadable_run(tmp_path):
    """The built-in run, shortened: checkpoint in HF format, settings, metrics, report; reload and re-patch."""
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(run),
                "--steps",
                "2",
                "--batch-size",
                "1",
                "--eval-samples",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    for name in (
        "metrics.jsonl",
        "report.json",
        "report.md",
        "report.png",
        "summary.json",
        "model/model.safetensors",
        "model/fastnest.json",
        "model/tokenizer.json",
        "model/processor_config.json",
    ):
        assert (run / name).is_file(), name
    records = _losses(run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(set(r["scale_losses"]) == {"1", "9", "36", "144", "576"} for r in records)
    assert all(set(r["lr"]) == {"projector", "lm"} for r in records)  # the built-in tower stays frozen
    report = json.loads((run / "report.json").read_text())
    assert report["num_samples"] == 4
    from fastnest.train.data_synthetic import DESIGNED_SCALES

    designed = {t: g["designed_granularity"] for t, g in report["types"].items()}
    assert designed == {t: DESIGNED_SCALES[t] for t in report["types"]}  # the built-in set's, beside the measured
    assert "| granularity: measured (designed) |" in (run / "report.md").read_text()
    model = LlavaForConditionalGeneration.from_pretrained(run / "model")
    fastnest.patch_llava(model, scales=tuple(json.loads((run / "model/fastnest.json").read_text())["scales"]))
    from fastnest.train.model import load_model_and_processor

    _, processor = load_model_and_processor(run / "model")
    inputs = processor(
        images=[torch.zeros(48, 48, 3, dtype=torch.uint8).numpy()],
        text=["USER: <image> what ASSISTANT:"],
        return_tensors="pt",
    )
    out = model.eval().generate(**inputs, scale=1, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_resume_is_exact(tmp_path, tiny_dir):
    straight = _cfg(tmp_path, tiny_dir, "straight", save_every=2, save_total_limit=3)
    train(straight)
    # Resume from the step-2 checkpoint in a copy of the run: steps 3-4 must repeat the straight run bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    train(_cfg(tmp_path, tiny_dir, "ignored", save_every=2, resume=str(resumed)))
    a, b = _losses(tmp_path / "straight"), _losses(resumed)
    assert [r["step"] for r in b] == [3, 4]
    assert [(r["loss"], r["scale_losses"]) for r in a[2:]] == [(r["loss"], r["scale_losses"]) for r in b]
    final_a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "straight" / "model").state_dict()
    final_b = LlavaForConditionalGeneration.from_pretrained(resumed / "model").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_gradient_accumulation_equals_the_full_batch(tmp_path, tiny_dir):
    train(_cfg(tmp_path, tiny_dir, "full", steps=2, batch_size=4))
    train(_cfg(tmp_path, tiny_dir, "accum", steps=2, batch_size=2, grad_accum=2))
    train(_cfg(tmp_path, tiny_dir, "ckpt", steps=2, batch_size=4, gradient_checkpointing=True))
    full, accum, ckpt = (_losses(tmp_path / n) for n in ("full", "accum", "ckpt"))
    for x, y, z in zip(full, accum, ckpt):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["loss"] == pytest.approx(z["loss"], rel=1e-6)
        assert x["lm_tokens"] == y["lm_tokens"]


def test_freeze_defaults_to_the_vision_tower_only_for_the_built_in_model():
    from fastnest.train.cli import train_parser

    assert TrainConfig().freeze == ("vision",) and TrainConfig(model="m").freeze == ()
    parse = train_parser().parse_args
    assert parse([]).freeze is None and parse(["--freeze", "none"]).freeze == ()
    assert TrainConfig(**vars(parse(["--freeze", "none"]))).freeze == ()
    assert TrainConfig(**vars(parse(["--freeze", "lm,projector"]))).freeze == ("lm", "projector")


def test_per_part_learning_rates_and_freezing(tmp_path, tiny_dir):
    train(_cfg(tmp_path, tiny_dir, steps=2, freeze=("vision",), lr=1e-3, lr_projector=5e-3, warmup_steps=1))
    records = _losses(tmp_path / "run")
    assert set(records[0]["lr"]) == {"projector", "lm"}  # no vision group: frozen
    assert records[0]["lr"]["projector"] == pytest.approx(5 * records[0]["lr"]["lm"])
    before = LlavaForConditionalGeneration.from_pretrained(tiny_dir).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if "vision_tower" in k:
            assert not changed, k
        elif "multi_modal_projector" in k or "layers.0.self_attn.q_proj" in k:
            assert changed, k


def test_bf16_runs_and_reports_finite_losses(tmp_path, tiny_dir):
    train(_cfg(tmp_path, tiny_dir, steps=2, bf16=True))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _losses(tmp_path / "run"))


def test_bad_data_fails_by_default_and_is_counted_when_skipped(tmp_path, tiny_dir, capsys):
    from tests.train_helpers import row, write_images, write_json

    names = write_images(tmp_path / "img", 3)
    data = write_json(tmp_path / "d.json", [row(names[0]), row("nope.png"), row(names[1]), row(names[2])])
    args = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--image-folder",
        str(tmp_path / "img"),
        "--scales",
        "1,4,16",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
        "--no-analyze",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    assert f"{data} row 1: image" in capsys.readouterr().err
    assert main([*args, "--on-bad-sample", "skip"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_samples"] == {"missing image": 1} and summary["bad_samples_total"] == 1


def test_checkpoints_are_pruned_and_listed_in_order(tmp_path, tiny_dir):
    train(_cfg(tmp_path, tiny_dir, steps=3, save_every=1, save_total_limit=2))
    assert [p.name for p in checkpoint.complete(tmp_path / "run")] == ["step-00000002", "step-00000003"]
    assert checkpoint.find(tmp_path / "run").name == "step-00000003"


def test_dummy_image_row_changes_neither_loss_nor_gradients():
    """Processes whose micro-batch has no image get a blank label-free image row, so that every process runs
    the tower (DDP/FSDP2 collectives); it must not change the loss or any gradient."""
    from fastnest.train.data_llava import Collator, Example
    from fastnest.train.trainer import with_dummy_row
    from tests.train_helpers import tiny_model, tiny_processor

    processor = tiny_processor()
    model = fastnest.patch_llava(tiny_model(processor, seed=4), scales=TINY_SCALES).train()
    conv = [{"from": "human", "value": "what colour is the dot ?"}, {"from": "gpt", "value": "blue"}]
    from fastnest.train.data_llava import BadSamples

    batch = Collator(processor, 16, 100, "A chat")(
        [Example(conv, [], "r0"), Example(conv[:1] + conv[1:], [], "r1")], BadSamples()
    )
    grads = []
    for inputs in (batch.inputs, with_dummy_row(batch.inputs, fastnest.patch_state(model).adapter.dummy_row(model))):
        model.zero_grad()
        out = model(**inputs, num_items_in_batch=4)
        out.loss.backward()
        grads.append(
            {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        )
        grads[-1]["loss"] = out.loss.detach()
    tower = [p for n, p in model.named_parameters() if "vision_tower" in n and "embeddings.patch" in n]
    assert tower and all(p.grad is not None for p in tower)  # the dummy row reached the tower
    assert "pixel_values" in with_dummy_row(batch.inputs, fastnest.patch_state(model).adapter.dummy_row(model))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_tokens_per_second_counts_the_tokens_the_packed_pass_ran(tmp_path, tiny_dir, monkeypatch):
    """``lm_tokens`` (and so tokens/s) is what the shared-prefix packed pass runs: a row's text before its image
    once, then per scale the rest of its text and the image's tokens at that scale."""
    from fastnest.train.data_llava import Collator

    batches = []
    collate = Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, *a: batches.append(collate(self, *a)) or batches[-1])
    run = tmp_path / "run"
    train(_cfg(tmp_path, tiny_dir, steps=2, batch_size=3))
    from tests.train_helpers import tiny_processor

    image_id = tiny_processor().tokenizer.image_token_id
    expected = []
    for batch in batches:
        tokens = 0
        for ids, mask in zip(batch.inputs["input_ids"], batch.inputs["attention_mask"]):
            ids = ids[mask.bool()]
            image = (ids == image_id).nonzero()
            if not len(image):
                tokens += len(ids)
                continue
            prefix, placeholders = int(image[0]), len(image)
            rest = len(ids) - prefix - placeholders
            tokens += prefix + sum(rest + placeholders // 16 * s for s in TINY_SCALES)
        expected.append(tokens)
    assert [r["lm_tokens"] for r in _losses(run)] == expected


def test_random_scale_sampling_trains_one_drawn_scale_per_step_and_resumes_exactly(tmp_path, tiny_dir):
    import random

    straight = _cfg(tmp_path, tiny_dir, "straight", steps=6, save_every=3, scale_sampling="random", seed=5)
    train(straight)
    records = _losses(tmp_path / "straight")
    draw = random.Random(5)  # patch_llava's draw restated: one scale per step, seeded with --seed
    assert [list(r["scale_losses"]) for r in records] == [[str(draw.sample(TINY_SCALES, 1)[0])] for _ in range(6)]
    assert len({next(iter(r["scale_losses"])) for r in records}) > 1
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    train(
        _cfg(tmp_path, tiny_dir, "ignored", steps=6, save_every=3, scale_sampling="random", seed=5, resume=str(resumed))
    )
    assert [(r["loss"], r["scale_losses"]) for r in _losses(resumed)] == [
        (r["loss"], r["scale_losses"]) for r in records[3:]
    ]


def test_scale_sampling_belongs_to_the_pooled_connector(tmp_path):
    with pytest.raises(ValueError, match="--scale-sampling random is an option of --connector pooled"):
        TrainConfig(output_dir=str(tmp_path), connector="mqt", scale_sampling="random")
    with pytest.raises(ValueError, match="--scale-sampling 'some': choose one of all, random"):
        TrainConfig(output_dir=str(tmp_path), scale_sampling="some")
