"""SIGINT/SIGTERM: the current step finishes, a checkpoint is written and named with how to resume, and the
resumed run is the uninterrupted one; a second signal stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastnest.train import checkpoint
from fastnest.train.cli import main
from tests.train_helpers import cli_args, records, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
# ``fastnest train`` whose steps are slowed down (step index ``LONG`` much more), so that a signal lands in one.
SLOW_STEP_DRIVER = """
import sys, time
from fastnest.train import trainer
forward_backward = trainer.forward_backward
LONG = int(sys.argv[1])
def slow(run, step, *a):
    time.sleep(60 if step == LONG else 0.3)
    return forward_backward(run, step, *a)
trainer.forward_backward = slow
from fastnest.train.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _start(args: list[str], long_step: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-c", SLOW_STEP_DRIVER, str(long_step), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)


@pytest.fixture
def one_thread():
    """The subprocess's thread count (OMP_NUM_THREADS=1) in this process: another count may change the last bits
    of a reduction, and the resumed run is compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigint_checkpoints_the_finished_step_and_the_resume_is_exact(tmp_path, tiny_dir, one_thread):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(["train", *cli_args(tiny_dir, straight, 8, 2)]) == 0
    args = cli_args(tiny_dir, run, 8, 2)
    proc = _start(args, long_step=-1)
    try:
        _wait_for_records(proc, run, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    done = records(run)[-1]["step"]
    assert 2 <= done < 8
    saved = checkpoint.find(run)
    assert saved.name == f"step-{done:08d}"
    assert f"SIGINT: stopped after step {done} of 8; checkpoint {saved} written" in err
    assert f"Resume with the same options plus --resume {run}" in err
    assert "Traceback" not in err
    assert main(["train", *args, "--resume", str(run)]) == 0
    assert [(r["step"], r["loss"]) for r in records(run)] == [(r["step"], r["loss"]) for r in records(straight)]


def test_a_second_sigterm_stops_at_once_without_a_checkpoint(tmp_path, tiny_dir):
    run = tmp_path / "run"
    proc = _start(cli_args(tiny_dir, run, 8, 2), long_step=2)  # the third step takes a minute
    try:
        _wait_for_records(proc, run, 2)
        time.sleep(1.0)  # inside the long step
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - started < 20  # did not wait for the step
    assert "SIGTERM again: stopped at once, without a checkpoint of the current step" in err
    assert checkpoint.complete(run) == [] and len(records(run)) == 2
