#!/usr/bin/env bash
# Install fastnest (editable, with test extras) into the CURRENT Python environment (`python -m pip`).
# - torch absent: install torch==2.13.0 first (pip's find-links here resolve it to the local CPU wheel;
#   a bare `torch` requirement would pull the newest CUDA build and several GB of nvidia-* packages).
# - torch present: pin exactly the installed version as a constraint, so pip can never upgrade or replace it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_CPU_VERSION=2.13.0

echo "install.sh: python = $(python -c 'import sys; print(sys.executable)')"

# What pip sees as installed is the distribution's metadata, so that is what decides "present".
installed_torch() {
    python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null
}

if ! torch_version=$(installed_torch); then
    echo "install.sh: torch not installed -> python -m pip install torch==${TORCH_CPU_VERSION}"
    python -m pip install "torch==${TORCH_CPU_VERSION}"
    torch_version=$(installed_torch)
else
    echo "install.sh: torch ${torch_version} already installed; keeping it"
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"

echo "install.sh: python -m pip install -e '.[test]' with constraint torch==${torch_version}"
python -m pip install -c "$constraints" -e ".[test]"

# lmms-eval for tests/test_lmms_eval_model.py, without its dependency set (that pulls torchvision, which would
# replace the CPU torch): its model API imports only pytz and loguru beyond fastnest's own dependencies.
echo "install.sh: lmms-eval 0.7.3 --no-deps, with pytz and loguru"
python -m pip install -c "$constraints" --no-deps "lmms-eval==0.7.3"
python -m pip install -c "$constraints" pytz loguru

python -c 'import fastnest, torch; print(f"install.sh: fastnest {fastnest.__version__}, torch {torch.__version__}")'
