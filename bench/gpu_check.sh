#!/usr/bin/env bash
# Every CUDA test and GPU benchmark in one go, for the first GPU lent (about ten minutes on one H200):
#   1. the CUDA tests of tests/ (selected by bench/cuda_only.py: the `gpu` marker, a skipif naming CUDA, or a
#      cuda parameter): the bf16-autocast and LLaVA ones first, then every other;
#   2. bench/test_projector_gpu.py (fused Triton projector vs unfused PyTorch, bf16);
#   3. the CUDA variants of bench/test_prefix.py (flash, xformers, flex: shared vs unshared prefix).
# Logs, JUnit XML, benchmark JSON and summary.md (device, date, software, what is missing, each phase's exit
# status) go to bench/results/<date>-gpu/. Each phase has its own time limit (seconds; env overrides):
# GPU_CHECK_FIRST_S (120), GPU_CHECK_TESTS_S (210), GPU_CHECK_PROJECTOR_S (100), GPU_CHECK_PREFIX_S (130);
# a phase stopped by its limit exits 124 (its log and summary line stay).
# Without a CUDA device it prints "no CUDA device: skipped" and exits 0. Nothing is installed: packages that
# are missing (flash-attn, xformers: the .[gpu] extras) are reported and their tests skip.
set -u
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device: skipped"
    exit 0
fi

day=$(date -u +%Y-%m-%d)
out="bench/results/${day}-gpu"
mkdir -p "$out"
summary="$out/summary.md"

python - >"$summary" <<'PY'
import datetime, importlib.metadata, importlib.util, platform, subprocess

import torch

def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None

props = torch.cuda.get_device_properties(0)
print(f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
print(f"- device: {torch.cuda.get_device_name(0)} (sm_{props.major}{props.minor}, "
      f"{props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible")
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, transformers {version('transformers')}")
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "?"
print(f"- fastnest commit {commit or '?'}")
missing = [d for d, m in (("flash-attn", "flash_attn"), ("xformers", "xformers")) if importlib.util.find_spec(m) is None]
present = [f"{d} {version(d)}" for d in ("flash-attn", "xformers") if d not in missing]
print(f"- attention packages: {', '.join(present) or 'none'}; missing: {', '.join(missing) or 'none'}"
      + (" (pip install .[gpu] needs a network: their tests skip)" if missing else ""))
print()
PY
cat "$summary"

phase() {  # phase NAME LIMIT_S COMMAND...: run with a time limit, log to $out/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local tail_line
    tail_line=$(grep -E "passed|failed|error|no tests ran" "$out/$name.log" | tail -1)
    echo "- $name: exit $rc in $((SECONDS - start)) s; ${tail_line:-see $name.log}" | tee -a "$summary"
    return $rc
}

status=0
first=(tests/test_attention_dtypes.py tests/test_llava.py)  # bf16 autocast steps, whole-model backends
phase tests-first "${GPU_CHECK_FIRST_S:-120}" python -m pytest -p bench.cuda_only -q -rfEs --durations=10 \
    --junitxml="$out/tests-first.xml" "${first[@]}" || status=1
phase tests-rest "${GPU_CHECK_TESTS_S:-210}" python -m pytest -p bench.cuda_only -q -rfEs --durations=20 \
    --junitxml="$out/tests-rest.xml" "${first[@]/#/--ignore=}" tests || status=1
phase projector "${GPU_CHECK_PROJECTOR_S:-100}" python -m pytest bench/test_projector_gpu.py --benchmark-only -s \
    --benchmark-json="$out/projector.json" || status=1
phase prefix "${GPU_CHECK_PREFIX_S:-130}" python -m pytest bench/test_prefix.py --benchmark-only -s \
    -k "flash or xformers or flex" --benchmark-json="$out/prefix.json" || status=1

echo "results in $out (status $status)"
exit $status
