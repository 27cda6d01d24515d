"""Impossible values are refused when parsed or patched, naming the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

import fastnest
from fastnest.hf.state import is_patched
from fastnest.train.cli import main
from fastnest.train.config import TrainConfig
from tests.train_helpers import tiny_model, tiny_processor, write_json


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", -1e-3, "--lr must be a finite positive number, got -0.001"),
        ("lr", math.nan, "--lr must be a finite positive number, got nan"),
        ("lr_projector", math.inf, "--lr-projector must be a finite positive number, got inf"),
        ("warmup_steps", -5, "--warmup-steps must be >= 0, got -5"),
        ("save_every", -1, "--save-every must be >= 0, got -1"),
        ("save_total_limit", -2, "--save-total-limit must be >= 0, got -2"),
        ("max_grad_norm", math.nan, r"--max-grad-norm must be a finite number >= 0 \(0 turns clipping off\), got nan"),
        ("max_grad_norm", -1.0, "--max-grad-norm must be a finite number >= 0"),
        ("weight_decay", math.nan, "--weight-decay must be a finite number >= 0, got nan"),
        ("eval_samples", 0, "--eval-samples must be positive, got 0"),
        ("eval_batch_size", 0, "--eval-batch-size must be positive, got 0"),
        ("synthetic_turns", 5, r"--synthetic-turns must be in 1..4 \(one question per type\), got 5"),
        ("max_nonfinite_skips", -1, "--max-nonfinite-skips must be >= 0, got -1"),
        ("resume_override", ("batch_size",), "batch_size cannot change on resume"),
        ("resume_override", ("colour",), "'colour' is not an option; allowed: steps,lr,"),
    ],
)
def test_impossible_training_values_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{option: value})


def test_the_command_reports_a_nan_learning_rate_before_doing_anything(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--lr", "nan", "--output-dir", str(run)]) == 2
    assert "fastnest train: error: --lr must be a finite positive number, got nan" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("option", ["--batch-size", "--samples", "--max-length"])
def test_analyze_refuses_non_positive_counts_when_parsing(option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", "m", option, "0"])
    assert e.value.code == 2
    assert f"argument {option}: must be a positive integer, got 0" in capsys.readouterr().err


def test_analyze_on_an_empty_file_is_an_error(tmp_path, capsys):
    from tests.train_helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    data = write_json(tmp_path / "empty.json", [])
    assert main(["analyze", "--model", str(model), "--data", str(data), "--device", "cpu"]) == 2
    assert f"--data {data}: no usable rows" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_analyze_refuses_an_output_dir_that_is_a_file_before_evaluating(tmp_path, capsys):
    from tests.train_helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "out").write_text("x")
    assert main(["analyze", "--model", str(model), "--output-dir", str(tmp_path / "out"), "--samples", "2"]) == 2
    assert f"--output-dir {tmp_path / 'out'} is a file; it must be a directory" in capsys.readouterr().err


def test_patch_refuses_a_single_int_as_scales():
    model = tiny_model(tiny_processor())
    for scales in (4, "1,4"):
        with pytest.raises(TypeError, match=f"scales must be a sequence of ints such as .*, got {scales!r}"):
            fastnest.patch_llava(model, scales=scales)
    assert not is_patched(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs here")
def test_patch_refuses_triton_kernels_without_cuda(monkeypatch):
    import fastnest.dispatch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fastnest.dispatch, "_triton_importable", lambda: True)  # installed or not, CUDA is missing
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA and torch.cuda.is_available.. is False"):
        fastnest.patch_llava(tiny_model(tiny_processor()), scales=(1, 4), backend="triton")
