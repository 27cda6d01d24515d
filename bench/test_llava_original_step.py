"""The original LLaVA code's training step, patched vs the released fork's loop (bench/llava_original_step.py),
run in that code's own environment (built and cached by tools/llava_original_env.py; skipped where it cannot be).

Run: ``python -m pytest bench/test_llava_original_step.py --benchmark-only -s``.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from bench.conftest import SUMMARIES
from tools.llava_original_env import REPO, Unavailable, child_env, ensure_env

ROUNDS = 3
_REPORT: list[str] = []


def test_llava_original_step(benchmark):
    try:
        python = ensure_env()
    except Unavailable as err:
        pytest.skip(f"the original LLaVA environment cannot be built here: {err}")
    cmd = [str(python), "-W", "ignore::FutureWarning", "-m", "bench.llava_original_step", "--rounds", str(ROUNDS)]

    def run() -> str:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads=2), capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    output = benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = float(re.search(r"ratio: ([0-9.]+)x", output).group(1))
    benchmark.extra_info.update(ratio=ratio)
    _REPORT[:] = ["original LLaVA (llava-torch) step, fastnest vs the released loop:", *output.strip().splitlines()]
    assert float(re.search(r"agree to ([0-9.e+-]+) relative", output).group(1)) < 1e-4


SUMMARIES.append(lambda: _REPORT)
