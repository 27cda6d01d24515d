"""Processes: DDP over gloo equals one process; a kill during a save leaves a resumable run; HF Trainer."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastnest
from fastnest.train import checkpoint
from fastnest.train.data_llava import BadSamples, Collator, SyntheticExamples
from fastnest.train.trainer import train
from tests.train_helpers import TINY_SCALES, cli_args, save_tiny_model, tiny_config, tiny_model, tiny_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("one") / "run"
    train(tiny_config(out, tiny_dir, steps=3, batch_size=4))
    return _records(out)


def _torchrun(args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fastnest.train",
        *args,
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_trajectory(one, two):
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["lm_tokens"] == b["lm_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        for s in a["scale_losses"]:
            assert b["scale_losses"][s] == pytest.approx(a["scale_losses"][s], rel=1e-5, abs=1e-6)


def test_two_gloo_processes_follow_the_one_process_trajectory(tmp_path, tiny_dir, one_process):
    _torchrun(cli_args(tiny_dir, tmp_path / "two", 3, 2))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp" and summary["global_batch"] == 4
    _same_trajectory(one_process, _records(tmp_path / "two"))
    assert one_process[-1]["loss"] < one_process[0]["loss"]  # it is a trajectory, not a constant


def test_fsdp2_over_gloo_follows_the_one_process_trajectory_and_resumes(tmp_path, tiny_dir, one_process):
    """FSDP2 (``fully_shard``) is meant for GPUs, but runs on CPU with gloo, so CI covers its code path."""
    _torchrun([*cli_args(tiny_dir, tmp_path / "fsdp", 3, 2), "--strategy", "fsdp", "--save-every", "2"])
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["strategy"] == "fsdp"
    _same_trajectory(one_process, _records(tmp_path / "fsdp"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    _torchrun([*cli_args(tiny_dir, "unused", 3, 2), "--strategy", "fsdp", "--resume", str(resumed)])
    assert _records(resumed) == [
        {**r, **{k: v for k, v in b.items() if k in ("step_s", "tokens_per_s", "wall_s", "cpu_s")}}
        for r, b in zip(_records(tmp_path / "fsdp")[2:], _records(resumed))
    ]


# ``fastnest train`` whose save of step 4 stalls after the weights and trainer state are in the temporary
# directory (before the rename), so that the test can kill it mid-save.
SLOW_SAVE_DRIVER = """
import sys, time
from fastnest.train import checkpoint
fsync_tree = checkpoint._fsync_tree
def stalled(path):
    if path.name.endswith("step-00000004"):
        time.sleep(300)
    fsync_tree(path)
checkpoint._fsync_tree = stalled
from fastnest.train.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_kill_during_save_leaves_the_previous_checkpoint_and_resume_finishes(tmp_path, tiny_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", SLOW_SAVE_DRIVER, *cli_args(tiny_dir, run, 6, 2), "--save-every", "2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = run / "checkpoints" / ".tmp-step-00000004"
    try:
        deadline = time.monotonic() + 300
        while not (partial / checkpoint.STATE).is_file():  # weights and trainer state written, not yet renamed
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the save of step 4 never started"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in checkpoint.complete(run)] == ["step-00000002"] and partial.is_dir()
    logged = _records(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]

    train(tiny_config("unused", tiny_dir, steps=6, batch_size=2, save_every=2, resume=str(run)))
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[:4]] == [r["loss"] for r in logged]  # steps 3-4 re-run exactly
    assert [p.name for p in checkpoint.complete(run)] == ["step-00000004", "step-00000006"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert (run / "model" / "model.safetensors").is_file()


def test_hf_trainer_trains_the_patched_model_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments

    processor = tiny_processor()
    model = fastnest.patch_llava(tiny_model(processor, seed=3), scales=TINY_SCALES)
    before = copy.deepcopy(model.state_dict())
    examples, bad = SyntheticExamples(24, seed=0, turns=2), BadSamples("fail")
    collate = Collator(processor, 16, 200, "A chat")

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples.example(i, bad)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=lambda xs: collate(xs, bad).inputs)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for part in (
        "embeddings.patch_embedding",  # the tower's (under vision_tower.vision_model in transformers 5.0)
        "multi_modal_projector.linear_1",
        "language_model.layers.1",
        "lm_head",
    ):
        keys = [k for k in after if part in k]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), part
