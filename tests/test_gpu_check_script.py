"""bench/gpu_check.sh skips cleanly without CUDA, and its test selection (bench/cuda_only.py) is the CUDA tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real check where there is a GPU")
def test_script_without_cuda_says_skipped_and_exits_0():
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "gpu_check: no CUDA device: skipped"


def test_selection_is_the_cuda_tests():
    files = ["tests/test_attention_dtypes.py", "tests/test_attention.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "bench.cuda_only", "--cuda-only-list", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    chosen = {line for line in run.stdout.splitlines() if "::" in line}
    names = {line.split("::")[1].split("[")[0] for line in chosen}
    assert "tests/test_attention_dtypes.py::test_cuda_autocast_training_step_runs_every_backend[flash]" in chosen
    assert "tests/test_attention.py::test_forward[4-4-seqlens0-None-flash-cuda-bfloat16]" in chosen
    assert not any("-cpu-" in line for line in chosen)  # the CPU parametrisations stay in the CPU suite
    assert {"test_compute_dtype", "test_error_cuda_backend_on_cpu", "test_info_from_seqlens"}.isdisjoint(names)
