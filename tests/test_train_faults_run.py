"""The trainer under faults: non-finite steps, a torn metrics line, a full disk, an unusable output directory,
and a resume with other options."""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastnest.train import checkpoint, metrics, trainer
from fastnest.train.cli import main
from tests.train_helpers import cli_args, records, row, save_tiny_model, write_images, write_json

STEP = "step-{:08d}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _finite(model_dir: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(model_dir / "model.safetensors").values())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, tiny_dir, capsys):
    run = tmp_path / "run"
    # Adam's steps are about lr whatever the gradient: 1e30 overflows the weights after the first update on every
    # transformers version (1e6 went NaN at step 3 with 5.24's initialisation, not within 8 steps with 5.0's)
    args = cli_args(tiny_dir, run, 8, 2, "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1")
    assert main(["train", *args, "--save-total-limit", "1"]) == 1
    logged = records(run)
    first_bad = next(r["step"] for r in logged if not math.isfinite(r["loss"]))
    assert logged[-1]["step"] == first_bad and logged[-1]["skipped"]  # nothing trained after it
    err = capsys.readouterr().err
    kept = checkpoint.complete(run)
    assert [p.name for p in kept] == [STEP.format(first_bad - 1)]  # pruning kept the finite one
    assert f"step {first_bad}: loss nan" in err and f"the last finite checkpoint is {kept[0]}" in err
    assert _finite(kept[0] / "model") and not (run / "model").exists() and not (run / "summary.json").exists()


def _poison(monkeypatch, steps: set[int], where: str):
    """Make the gradients (``where="grad"``) or, after the update, a weight (``"weight"``) NaN at ``steps``."""
    forward_backward, finish_step = trainer.forward_backward, trainer.finish_step

    def poisoned_grads(run, step, *a):
        stats = forward_backward(run, step, *a)
        if where == "grad" and step + 1 in steps:
            stats.grad_norm = math.nan
        return stats

    def poisoned_weights(run, apply):
        finish_step(run, apply)
        if where == "weight" and run.scheduler.last_epoch in steps:
            with torch.no_grad():
                run.model.lm_head.weight[0, 0] = math.nan

    monkeypatch.setattr(trainer, "forward_backward", poisoned_grads)
    monkeypatch.setattr(trainer, "finish_step", poisoned_weights)


def test_non_finite_steps_are_skipped_up_to_the_limit(tmp_path, tiny_dir, monkeypatch, capsys):
    _poison(monkeypatch, {2, 3}, "grad")
    straight = tmp_path / "straight"
    assert main(["train", *cli_args(tiny_dir, tmp_path / "skip", 4, 2, "--max-nonfinite-skips", "2")]) == 0
    logged = records(tmp_path / "skip")
    assert [r.get("skipped", False) for r in logged] == [False, True, True, False]
    lrs = [r["lr"]["lm"] for r in logged]  # the rate for the next step: skipped steps leave the schedule
    assert lrs[0] == lrs[1] == lrs[2] < lrs[3]
    assert _finite(tmp_path / "skip" / "model")
    assert main(["train", *cli_args(tiny_dir, straight, 4, 2, "--max-nonfinite-skips", "1")]) == 1
    err = capsys.readouterr().err
    assert "step 3: loss" in err and "gradient norm nan (not finite, 2 steps in a row)" in err
    assert [r["step"] for r in records(straight)] == [1, 2, 3]


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_dir, monkeypatch, capsys):
    _poison(monkeypatch, {3}, "weight")
    run = tmp_path / "run"
    args = cli_args(tiny_dir, run, 5, 2, "--save-every", "1", "--save-total-limit", "1")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "step 3: parameter(s) not finite (lm_head.weight); checkpoint step 3 not written" in err
    assert [p.name for p in checkpoint.complete(run)] == [STEP.format(2)] and _finite(checkpoint.find(run) / "model")


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_dir, caplog):
    import shutil

    run = tmp_path / "run"
    args = cli_args(tiny_dir, run, 4, 2, "--save-every", "2")
    assert main(["train", *args]) == 0
    straight = records(run)
    # As if killed while appending step 3's record: checkpoint 2 is the newest, the last line is torn.
    shutil.rmtree(run / "checkpoints" / STEP.format(4))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:25])
    with caplog.at_level(logging.WARNING, "fastnest.train"):
        assert main(["train", *args, "--resume", str(run)]) == 0
    assert f"{run / 'metrics.jsonl'}: dropped its torn last line 3" in caplog.text
    assert [(r["step"], r["loss"]) for r in records(run)] == [(r["step"], r["loss"]) for r in straight]


def test_a_bad_metrics_line_before_the_end_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a JSON record"):
        metrics.truncate(path, 3)


def _fail_to_write(monkeypatch, name: str, error: BaseException) -> None:
    """``torch.save`` of the file ``name`` of checkpoint 4 raises ``error``, as on a disk that just filled up."""
    save = torch.save

    def failing(obj, f, *a, **kw):
        if Path(f).name == name and Path(f).parent.name == ".tmp-" + STEP.format(4):
            raise error
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),  # torch's own words
    ],
)
def test_a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint(
    tmp_path, tiny_dir, monkeypatch, capsys, error
):
    from collections import namedtuple

    from fastnest.train import storage

    run = tmp_path / "run"
    _fail_to_write(monkeypatch, checkpoint.STATE if isinstance(error, OSError) else "rng-rank0.pt", error)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
    assert main(["train", *cli_args(tiny_dir, run, 4, 2, "--save-every", "2")]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing checkpoint step 4 ({run / 'checkpoints'}; 4096 bytes free)" in err
    assert f"checkpoint {run / 'checkpoints' / STEP.format(2)} is intact, resume with --resume {run}" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == [STEP.format(2)]  # the partial save removed


def test_a_failed_write_with_space_left_is_not_called_a_full_disk(tmp_path, tiny_dir, monkeypatch):
    _fail_to_write(monkeypatch, checkpoint.STATE, RuntimeError("[enforce fail at inline_container.cc:672] . boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", *cli_args(tiny_dir, tmp_path / "run", 4, 2, "--save-every", "2")])


def test_a_full_disk_while_appending_metrics_is_named(tmp_path, tiny_dir, monkeypatch, capsys):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", full)
    run = tmp_path / "run"
    assert main(["train", *cli_args(tiny_dir, run, 2, 2)]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing metrics ({run / 'metrics.jsonl'}" in err
    assert "no checkpoint was written yet" in err


def test_output_dir_that_is_a_file_or_cannot_be_written(tmp_path, tiny_dir, monkeypatch, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["train", *cli_args(tiny_dir, file, 2, 2)]) == 2
    assert f"--output-dir {file} is a file; it must be a directory" in capsys.readouterr().err
    assert main(["train", *cli_args(tiny_dir, file / "run", 2, 2)]) == 2
    assert f"--output-dir {file / 'run'} cannot be created: Not a directory" in capsys.readouterr().err
    write_bytes = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".fastnest-write-test"):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(["train", *cli_args(tiny_dir, tmp_path / "ro", 2, 2)]) == 2
    assert f"--output-dir {tmp_path / 'ro'} is not writable: Read-only file system" in capsys.readouterr().err


def test_resume_with_changed_options_refuses_listing_each(tmp_path, tiny_dir, capsys):
    names = write_images(tmp_path, 4)
    data = write_json(tmp_path / "d.json", [row(n) for n in names])
    run = tmp_path / "run"
    base = [*cli_args(tiny_dir, run, 2, 2, "--save-every", "1"), "--data", str(data)]
    assert main(["train", *base]) == 0
    write_json(data, [row(n, answer="blue") for n in names])  # same file name, other content
    changed = ["--batch-size", "1", "--scales", "1,4", "--seed", "3", "--steps", "3", "--grad-accum", "2"]
    assert main(["train", *base, *changed, "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    for line in (
        "--batch-size: checkpoint 2, now 1",
        "--scales: checkpoint [1, 4, 16], now [1, 4]",
        "--seed: checkpoint 0, now 3",
        "--steps: checkpoint 2, now 3",
        "--grad-accum: checkpoint 1, now 2",
        "--data-sha256: checkpoint",
        "pass --resume-override steps",
    ):
        assert line in err, line
    assert [r["step"] for r in records(run)] == [1, 2]  # nothing ran


def test_an_override_of_a_safe_option_is_accepted_and_recorded(tmp_path, tiny_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *cli_args(tiny_dir, run, 2, 2, "--save-every", "1")]) == 0
    longer = cli_args(tiny_dir, run, 3, 2, "--save-every", "1", "--resume", str(run))
    assert main(["train", *longer]) == 2 and "--steps: checkpoint 2, now 3" in capsys.readouterr().err
    assert main(["train", *longer, "--resume-override", "steps"]) == 0
    expected = [{"option": "steps", "checkpoint": 2, "now": 3, "at_step": 2}]
    assert json.loads((run / "summary.json").read_text())["resume_overrides"] == expected
    saved = json.loads((checkpoint.find(run) / "trajectory.json").read_text())
    assert saved["overrides"] == expected and saved["steps"] == 3
    assert [r["step"] for r in records(run)] == [1, 2, 3]


@pytest.fixture
def small_disk(tmp_path):
    """A 800 KiB tmpfs (one checkpoint of the tiny model fits, two do not), where this machine lets us mount."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the simulated ENOSPC tests cover it")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_previous_checkpoint(tiny_dir, small_disk, capsys):
    run = small_disk / "run"
    args = cli_args(tiny_dir, run, 2, 2, "--save-every", "1", "--save-total-limit", "1")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "no space left on device writing checkpoint step 2" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == [STEP.format(1)]
    assert [r["step"] for r in records(run)] == [1, 2]


def test_a_checkpoint_without_saved_options_resumes_with_a_warning(tmp_path, caplog):
    from fastnest.train import resume

    with caplog.at_level(logging.WARNING, "fastnest.train"):
        assert resume.check(tmp_path, {"steps": 3}, ()) == []
    assert f"{tmp_path} has no trajectory.json (an older checkpoint): its options cannot be compared" in caplog.text


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"), False),  # with space left
    ],
)
def test_full_disk_errors_are_told_from_other_write_errors(tmp_path, error, full):
    from fastnest.train import storage

    assert storage.is_disk_full(error, tmp_path) is full
