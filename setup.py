"""Build entry for fastnest.

setup.py drives the build (as in vLLM): the native CPU extension ``fastnest._C`` will be built from
CMakeLists.txt (sources under kernels/) with ninja by a CMake ``build_ext`` registered here. It does not
exist yet, so ``ext_modules`` is empty and the wheel is pure Python.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    # Parsed, not imported: importing fastnest needs torch, which the build environment does not have.
    text = (ROOT / "fastnest" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


setup(
    name="fastnest",
    version=read_version(),
    description="Matryoshka multimodal training and inference in one packed pass",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastnest", "fastnest.*"]),
    install_requires=[
        "torch>=2.13",  # tested lower bound (the only build installable on the CPU test machines)
        "transformers>=5.0",
        "triton; platform_system == 'Linux'",
        "ninja",
        "numpy",
        "pillow",  # images of fastnest train/analyze and the report's plot
        "tqdm",
    ],
    entry_points={"console_scripts": ["fastnest=fastnest.cli:main"]},
    extras_require={
        "gpu": ["flash-attn", "xformers"],
        "test": ["pytest", "pytest-benchmark", "ruff", "pillow", "numpy", "accelerate"],  # accelerate: transformers.Trainer
    },
    ext_modules=[],  # fastnest._C (CMakeLists.txt) goes here with its CMake build_ext
)
