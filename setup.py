"""Build entry for fastnest.

setup.py drives the build (as in vLLM): the native CPU extension ``fastnest._C`` is built from CMakeLists.txt
(C++/OpenMP sources under kernels/cpu/) with ninja by the CMake ``build_ext`` below, then copied next to the
package (editable installs included). The extension is optional: without a C++ compiler, cmake or OpenMP, or
with ``FASTNEST_BUILD_NATIVE=0``, the install still succeeds (with a warning; pip shows it with ``-v``) and
fastnest runs on its PyTorch path (``fastnest.dispatch.native_available()`` is False).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def read_version() -> str:
    # Parsed, not imported: importing fastnest needs torch, which the build environment does not have.
    text = (ROOT / "fastnest" / "version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt instead of setuptools' compiler driver."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], optional=True)


def _warn_skipped(reason: str) -> None:
    bar = "=" * 100
    print(
        f"\n{bar}\nWARNING: fastnest's native CPU extension fastnest._C was not built: {reason}\n"
        "fastnest is installed without it and runs its PyTorch path on CPU "
        "(fastnest.dispatch.native_available() is False).\n"
        "To build it: a C++17 compiler with OpenMP, cmake >= 3.18 and ninja, then reinstall fastnest.\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


class cmake_build_ext(build_ext):
    """Configures CMakeLists.txt with ninja, builds, and copies the module to where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if os.environ.get("FASTNEST_BUILD_NATIVE", "1") == "0":
            return _warn_skipped("FASTNEST_BUILD_NATIVE=0")
        cmake = os.environ.get("CMAKE") or shutil.which("cmake")
        if cmake is None:
            return _warn_skipped("cmake was not found on PATH (set CMAKE to its path)")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        lib_dir = build_dir / "lib"
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTNEST_OUTPUT_DIR={lib_dir}",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        try:
            subprocess.run(configure, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            return _warn_skipped(f"the CMake build failed ({e}); its output is above")
        built = sorted(lib_dir.glob("_C*"))
        if len(built) != 1:
            return _warn_skipped(f"expected one built module in {lib_dir}, found {[p.name for p in built]}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


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
        "matplotlib>=3.7",  # figures of fastnest train/analyze/plot (3.7: legends placed "outside")
        "pillow",  # images of fastnest train/analyze
        "tqdm",
    ],
    entry_points={
        "console_scripts": ["fastnest=fastnest.train.cli:main"],
        # lmms-eval (>= 0.7) finds plugin models here: `python -m lmms_eval --model fastnest ...`
        "lmms_eval.models": ["fastnest=fastnest.eval.manifest:lmms_eval_manifest"],
    },
    extras_require={
        # flash-attn 2.1: bottom-right causal alignment; xformers 0.0.28: attention biases built on a device
        "gpu": ["flash-attn>=2.1", "xformers>=0.0.28"],
        "test": ["pytest", "pytest-benchmark", "ruff", "accelerate"],  # accelerate: transformers.Trainer
        "convert": ["sentencepiece", "protobuf"],  # fastnest convert: a tokenizer shipped as tokenizer.model
        "eval": ["lmms-eval>=0.7.3,<0.8"],  # the fastnest model of lmms-eval (fastnest/eval/)
    },
    ext_modules=[CMakeExtension("fastnest._C")],
    cmdclass={"build_ext": cmake_build_ext},
)
