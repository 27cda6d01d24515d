"""fp16 trains only with a grad scaler: ``--fp16`` is fp16 autocast over float32 master weights with
``torch.amp.GradScaler``; ``--dtype`` names the loading dtype (float32 by default), and fp16 master weights are
refused. Runs on a tiny checkpoint saved in fp16."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from fastnest.train import scaling, trainer
from fastnest.train.cli import main
from fastnest.train.config import TrainConfig
from fastnest.train.model import save_run_model
from tests.train_helpers import TINY_SCALES, cli_args, records, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "model"
    processor = tiny_processor()
    save_run_model(tiny_model(processor).to(torch.float16), processor, path, {"scales": list(TINY_SCALES)})
    return path


def _stored_dtypes(model_dir) -> set[torch.dtype]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {f.get_tensor(name).dtype for name in f.keys()}


def test_fp16_autocast_trains_fp32_weights_with_a_grad_scaler(tmp_path, fp16_dir):
    """Step 1's loss (before any update) is the fp32 run's to fp16 accuracy; the default scale 2**16 overflows
    the tiny model's fp16 gradients at first (those steps are skipped, each halving the scale), then the
    updates apply and the loss scale counts its clean steps toward the next doubling (after 2000)."""
    assert main(["train", *cli_args(fp16_dir, tmp_path / "fp32", 1, 2)]) == 0
    assert main(["train", *cli_args(fp16_dir, tmp_path / "fp16", 4, 2, "--fp16")]) == 0
    (fp32,), fp16 = records(tmp_path / "fp32"), records(tmp_path / "fp16")
    assert fp16[0]["loss"] == pytest.approx(fp32["loss"], rel=1e-2) and fp16[0]["loss"] != fp32["loss"]
    skipped = [bool(r.get("skipped")) for r in fp16]
    assert not skipped[-1] and skipped == sorted(skipped, reverse=True)  # overflows only while the scale drops
    assert all(math.isfinite(r["loss"]) for r in fp16)
    assert all(math.isfinite(r["grad_norm"]) for r, s in zip(fp16, skipped) if not s)
    assert _stored_dtypes(tmp_path / "fp16" / "model") == {torch.float32}  # the master weights stayed fp32
    state = torch.load(tmp_path / "fp16" / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0 ** (16 - sum(skipped))
    assert state["scaler"]["_growth_tracker"] == skipped.count(False)


def test_an_fp16_overflow_is_skipped_and_the_scale_lowered_not_a_fault(tmp_path, fp16_dir, monkeypatch):
    """Scale 2**40: the fp16 gradients overflow in step 1, the scaler lowers the scale to 2**20 (backoff
    2**-20) and the run goes on: the non-finite guard (--max-nonfinite-skips 0) does not stop it."""
    scaler = functools.partial(torch.amp.GradScaler, init_scale=2.0**40, backoff_factor=2.0**-20)
    monkeypatch.setattr(scaling.torch.amp, "GradScaler", scaler)
    assert main(["train", *cli_args(fp16_dir, tmp_path / "run", 3, 2, "--fp16")]) == 0
    logged = records(tmp_path / "run")
    assert logged[0]["skipped"] and math.isfinite(logged[0]["loss"]) and not math.isfinite(logged[0]["grad_norm"])
    assert not logged[-1].get("skipped") and math.isfinite(logged[-1]["grad_norm"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=False)
    skipped = sum(bool(r.get("skipped")) for r in logged)
    assert state["scaler"]["scale"] == 2.0 ** (40 - 20 * skipped)


def test_bf16_named_dtype_loads_and_trains_in_bf16(tmp_path, fp16_dir):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), model=str(fp16_dir), scales=TINY_SCALES, dtype="bfloat16")
    model, _ = trainer._load(cfg, None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {
        p.dtype for p in trainer._load(TrainConfig(model=str(fp16_dir), scales=TINY_SCALES), None)[0].parameters()
    } == {torch.float32}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "float16"}, "--dtype float16: fp16 master weights would train without a grad scaler"),
        ({"dtype": "half"}, "--dtype must be one of float32, bfloat16, float16, got 'half'"),
        ({"fp16": True, "bf16": True}, "--bf16 and --fp16 are exclusive"),
        ({"fp16": True, "dtype": "bfloat16"}, "--fp16 needs float32 master weights .* got --dtype bfloat16"),
    ],
)
def test_error_precision_options(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_error_fp16_with_fsdp():
    with pytest.raises(ValueError, match="--fp16 with FSDP2 is not supported"):
        scaling.check_strategy(True, "fsdp")
    scaling.check_strategy(True, "ddp")


def test_resume_of_an_fp16_run_continues_its_scaler(tmp_path, fp16_dir):
    args = cli_args(fp16_dir, tmp_path / "run", 3, 2, "--fp16", "--save-every", "1")
    assert main(["train", *args]) == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = tmp_path / "run" / "checkpoints" / "step-00000002"
    shutil.copytree(src, resumed / "checkpoints" / src.name)
    assert main(["train", *cli_args(fp16_dir, tmp_path / "unused", 3, 2, "--fp16", "--resume", str(resumed))]) == 0
    state = torch.load(resumed / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=False)
    straight = torch.load(tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=False)
    assert state["scaler"] == straight["scaler"]  # the resumed run continued the scaler's state
    assert json.loads((resumed / "checkpoints" / "step-00000003" / "trajectory.json").read_text())["fp16"] is True
