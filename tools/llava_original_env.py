"""The environment of the original LLaVA code's own versions, built on demand for its tests and benchmark.

A virtual environment (``~/.cache/fastnest/llava-original-env/<tag>``, or ``$FASTNEST_LLAVA_ENV``) holding
``transformers==4.36.2`` (the original code's pin) with the tokenizers, huggingface-hub and accelerate versions
it needs, and ``llava-torch==1.2.2.post1``, each installed ``--no-deps`` (llava-torch's own requirements pin
torch 2.0.1 and torchvision, which must never be installed). Everything else (torch as installed, numpy,
PIL, pytest, ...) is the running interpreter's: its site directories are added after the environment's own
by a ``.pth`` file, so the pins shadow the newer versions. (``venv --system-site-packages`` would see the
base interpreter's packages, not those of a virtual environment the tests run in, as CI's.) fastnest itself
is the repository, on ``PYTHONPATH``. A marker file records what was built; a valid environment is reused,
anything else is rebuilt. ``tag`` names the running interpreter, so each one gets its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = (
    "transformers==4.36.2",
    "tokenizers==0.15.0",  # llava-torch's pin (transformers 4.36 takes >=0.14,<0.19)
    "huggingface-hub==0.20.3",  # transformers 4.36 needs <1.0
    "accelerate==0.21.0",  # llava-torch's pin; the 4.36 Trainer passes arguments accelerate 1.x removed
    "llava-torch==1.2.2.post1",
)
# huggingface-hub 0.20 imports requests, which transformers 5's own dependency set no longer brings: installed with
# its (small, pure) dependencies where the running interpreter lacks it
WITH_DEPS = ("requests",)
LAYOUT = 2  # bump when the way the environment is built changes
MARKER = "fastnest-env.json"
CHECK = (
    "import transformers, tokenizers, huggingface_hub, accelerate, llava.model, llava.train.train\n"
    "assert transformers.__version__ == '4.36.2', transformers.__version__\n"
    "from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM\n"
)
PIP_TIMEOUT_S = 600


class Unavailable(Exception):
    """The environment cannot be built here (no network, no PyPI): its tests skip with this reason."""


def _parent_sites() -> list[str]:
    sites = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        sites.append(site.getusersitepackages())
    return sites


def env_dir() -> Path:
    base = os.environ.get("FASTNEST_LLAVA_ENV")
    if base:
        return Path(base)
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fastnest" / "llava-original-env" / tag


def _wanted() -> dict:
    pins = [*PINS, *WITH_DEPS]
    return {"layout": LAYOUT, "pins": pins, "python": sys.executable, "sites": _parent_sites()}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (tests and benchmarks may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, timeout: int) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"{what} failed: {err}") from err
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise Unavailable(f"{what} failed (no network or no PyPI?): {tail}")


def ensure_env() -> Path:
    """The environment's python, built if absent or stale; Unavailable when it cannot be built."""
    root = env_dir()
    python = root / "bin" / "python"
    with _locked(root.with_name(root.name + ".lock")):
        marker = root / MARKER
        if python.exists() and marker.exists() and json.loads(marker.read_text()) == _wanted():
            return python
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(root)], "python -m venv", 120)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        lines = [f"import site; site.addsitedir({s!r})" for s in _parent_sites()]
        Path(purelib, "zz_fastnest_parent_sites.pth").write_text("\n".join(lines) + "\n")
        # --ignore-installed: the parent's newer versions are visible and must be shadowed, never uninstalled
        pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", *PINS]
        _run(pip, f"pip install {' '.join(PINS)}", PIP_TIMEOUT_S)
        _run([str(python), "-m", "pip", "install", "-q", *WITH_DEPS], f"pip install {' '.join(WITH_DEPS)}", 300)
        # installed but not importable is this recipe's fault, not the machine's: fail, never skip
        check = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            raise RuntimeError(f"the original LLaVA environment {root} was built but does not import:\n{check.stderr}")
        marker.write_text(json.dumps(_wanted(), indent=1))
    return python


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment variables for a child process of the environment's python: the repository's fastnest first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; nothing may reach the Hub
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env
