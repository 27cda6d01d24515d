"""The peer suite's harness: transformers' own common model tests, fetched from the PyPI source distribution of
the installed release at test time (never committed), run in a child pytest over ``llava_cases.py``.

``prepare(version)`` downloads the sdist into a cache, extracts ``tests/test_modeling_common.py`` and the files
it imports that the sdist holds, and writes a stub for each relatively imported module it lacks (the sdist ships
only the top level of ``tests/``). ``run_suite`` runs one child pytest and returns per-test outcomes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

# The package name the sdist's ``tests/`` is extracted as: not ``tests`` (the project's own tests package).
PACKAGE = "hf_sdist_tests"
ENTRY = "test_modeling_common.py"
MANIFEST = "manifest.json"  # what was extracted and stubbed, for the report
LAYOUT = 1  # bump when the extraction or the stubs change: the cache keeps one tree per layout
CASES = Path(__file__).with_name("llava_cases.py")
REPO = Path(__file__).resolve().parents[2]
# a traceback frame in pytest's --tb=short text: "path/to/file.py:123: in function"
_FRAME = re.compile(r"^(\S+\.py):(\d+): in (\S+)$")
# Third-party test dependencies of the sdist's tests that fastnest's environment need not have: module -> dist.
TEST_DEPS = {"parameterized": "parameterized"}


class Unavailable(Exception):
    """The sdist (or a test dependency) cannot be fetched: the suite skips with this reason."""


def cache_root() -> Path:
    base = os.environ.get("FASTNEST_PEER_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastnest" / "peer"


def _pip_download(args: list[str], dest: Path, what: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=320)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"pip download of {what} failed (no network?): {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"pip download of {what} failed (no network?): {' | '.join(tail)}")


def _sdist(version: str, root: Path) -> Path:
    found = sorted((root / "dist").glob(f"transformers-{version}.tar.gz"))
    if not found:
        _pip_download(["--no-binary", ":all:", f"transformers=={version}"], root / "dist", f"transformers=={version}")
        found = sorted((root / "dist").glob(f"transformers-{version}.tar.gz"))
    if not found:
        raise Unavailable(f"pip download left no transformers-{version}.tar.gz in {root / 'dist'}")
    return found[0]


def _relative_imports(source: str) -> list[tuple[int, str, list[str]]]:
    """``(level, module, names)`` of every relative import in ``source``, top level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.level, node.module or "", [a.name for a in node.names]))
    return out


def _import_targets(base: Path, source: str) -> list[tuple[str, list[str] | None]]:
    """Relative imports of a file in ``base`` as ``(path under tests/ without suffix, names)``; ``names`` is None
    where the target is itself a name of ``from . import name`` (a submodule if the sdist has it, else nothing)."""
    out: list[tuple[str, list[str] | None]] = []
    for level, module, names in _relative_imports(source):
        anchor = base
        for _ in range(level - 1):
            anchor = anchor.parent
        if module:
            out.append((anchor.joinpath(*module.split(".")).as_posix(), names))
        else:
            out.extend(((anchor / name).as_posix(), None) for name in names)
    return [(path.removeprefix("./"), names) for path, names in out]


def _top_level_modules(source: str) -> set[str]:
    """Top-level packages imported unconditionally at module level (those must import in the child)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _stub_source(module: str, names: set[str]) -> str:
    """A module standing in for one the sdist lacks: CamelCase names are empty classes (mixin bases), ALL_CAPS
    names empty tuples, anything else a function that skips the test calling it."""
    lines = [f'"""Stub written by fastnest\'s peer harness: {module} is not in the transformers sdist."""', ""]
    lines.append("import unittest")
    for name in sorted(names):
        if name == "*":
            continue
        if name.isupper():
            lines.append(f"{name} = ()")
        elif name[:1].isupper():
            lines.append(f"class {name}:\n    pass")
        else:
            lines.append(
                f"def {name}(*args, **kwargs):\n    raise unittest.SkipTest('{module}.{name} is stubbed (not in sdist)')"
            )
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Prepared:
    version: str
    path: Path  # the directory to put on sys.path: it holds the PACKAGE directory (and test-dependency wheels)
    extracted: list[str]  # sdist paths under tests/
    stubbed: dict[str, list[str]]  # stub module (dotted, inside PACKAGE) -> names it provides
    wheels: list[Path]  # test-dependency wheels to put on sys.path (zip-importable, pure Python)


def _extract(sdist: Path, version: str, dest: Path) -> tuple[list[str], dict[str, list[str]]]:
    """``tests/ENTRY`` and its relative imports from ``sdist`` into ``dest/PACKAGE``; stubs for the missing."""
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as tar:
        members = {m.name[len(prefix) :]: m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()}

        def read(rel: str) -> str:
            handle = tar.extractfile(members[rel])
            assert handle is not None
            return handle.read().decode()

        if ENTRY not in members:
            raise RuntimeError(f"{sdist.name} has no tests/{ENTRY}")
        pkg = dest / PACKAGE
        extracted: list[str] = []
        stubs: dict[str, set[str]] = {}
        queue = [ENTRY]
        while queue:
            rel = queue.pop()
            if rel in extracted:
                continue
            source = read(rel)
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            (pkg / rel).write_text(source)
            extracted.append(rel)
            for target, imported in _import_targets(Path(rel).parent, source):
                found = next((c for c in (f"{target}.py", f"{target}/__init__.py") if c in members), None)
                if found:
                    queue.append(found)
                elif imported is not None:  # a module the sdist lacks: stub the names imported from it
                    stubs.setdefault(target.replace("/", "."), set()).update(imported)
    # Packages for every directory on the way (the sdist's tests/ has no __init__.py files).
    for directory in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    for module, names in stubs.items():
        path = pkg.joinpath(*module.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            (pkg / parent / "__init__.py").touch()
        path.with_suffix(".py").write_text(_stub_source(module, names))
    return sorted(extracted), {m: sorted(n) for m, n in stubs.items()}


def prepare(version: str) -> Prepared:
    """The sdist's common model tests for ``version``, ready to import as ``PACKAGE`` (cached per version)."""
    root = cache_root() / f"transformers-{version}"
    sdist = _sdist(version, root)
    dest = root / f"src-{LAYOUT}"
    if not (dest / MANIFEST).exists():
        # extract next to the cache and rename: a concurrent or interrupted run never sees half a tree
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix="src."))
        try:
            extracted, stubbed = _extract(sdist, version, tmp)
            (tmp / MANIFEST).write_text(json.dumps({"extracted": extracted, "stubbed": stubbed}, indent=1))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        except OSError:
            if not (dest / MANIFEST).exists():  # not a concurrent run that got there first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((dest / MANIFEST).read_text())
    extracted, stubbed = manifest["extracted"], manifest["stubbed"]
    wheels = []
    entry_imports = _top_level_modules((dest / PACKAGE / ENTRY).read_text())
    for module, dist in TEST_DEPS.items():
        if module in entry_imports and not _importable(module):
            wheel_dir = root / "wheels" / dist
            if not list(wheel_dir.glob("*.whl")):
                _pip_download(["--only-binary", ":all:", dist], wheel_dir, dist)
            wheels.extend(sorted(wheel_dir.glob("*.whl"))[-1:])
    return Prepared(version, dest, extracted, stubbed, wheels)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclasses.dataclass
class Outcome:
    outcome: str  # "passed", "failed" or "skipped"
    message: str = ""  # the failure's (or skip's) message attribute
    text: str = ""  # the failure's full traceback text

    def summary(self) -> str:
        """One line: the error (pytest's first ``E`` line) and the frame that raised it (``file:line in f: src``)."""
        lines = self.text.splitlines()
        first_e = next((i for i, line in enumerate(lines) if line.startswith("E ")), None)
        if first_e is None:
            return (self.message.splitlines() or [""])[0][:300]
        error = lines[first_e][1:].strip()
        frames = [i for i, line in enumerate(lines[:first_e]) if _FRAME.match(line)]
        if not frames:
            return error[:300]
        file, lineno, func = _FRAME.match(lines[frames[-1]]).groups()
        source = next((s.strip() for s in lines[frames[-1] + 1 : first_e] if s.strip().strip("^~ ")), "")
        return f"{error[:300]}  [at {Path(file).name}:{lineno} in {func}: {source[:100]}]"


@dataclasses.dataclass
class SuiteResult:
    outcomes: dict[str, Outcome]
    returncode: int
    output: str
    seconds: float

    def count(self, outcome: str) -> int:
        return sum(o.outcome == outcome for o in self.outcomes.values())

    def counts(self) -> str:
        return f"{self.count('passed')} passed / {self.count('failed')} failed / {self.count('skipped')} skipped"


def parse_junit(path: Path) -> dict[str, Outcome]:
    """Per-test outcomes from a pytest junit XML file (a test with a failure or an error is failed)."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # the classname is dotted from the rootdir ("" outside it): keep the class, drop the module path
        classname = case.get("classname", "").rsplit(".", 1)[-1]
        name = f"{classname}::{case.get('name', '')}".removeprefix("::")
        bad = [c for c in case if c.tag in ("failure", "error")]
        skipped = [c for c in case if c.tag == "skipped"]
        if bad:
            outcomes[name] = Outcome(
                "failed",
                "\n".join(c.get("message", "") for c in bad),
                "\n".join((c.text or "") for c in bad),
            )
        elif skipped:
            outcomes[name] = Outcome("skipped", skipped[0].get("message", ""))
        else:
            outcomes[name] = Outcome("passed")
    return outcomes


def _repo_packages(workdir: Path) -> Path:
    """A directory holding only the repository's Python packages (links): with the repository root itself on
    sys.path, its ``kernels/`` source folder imports as a namespace package and shadows Hugging Face's
    ``kernels`` (transformers 5.0's ``is_kernels_available`` then fails at the mixin's import)."""
    links = workdir / "packages"
    links.mkdir(exist_ok=True)
    for name in ("fastnest", "tests", "tools"):
        if not (links / name).exists():
            (links / name).symlink_to(REPO / name, target_is_directory=True)
    return links


def run_suite(
    prepared: Prepared,
    patched: bool,
    workdir: Path,
    timeout_s: int,
    threads: int | None = None,
    extra: list[str] | None = None,
) -> SuiteResult:
    """One child pytest over ``llava_cases.py``: plain, or with every Llava model patched after construction."""
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    tag = "patched" if patched else "plain"
    junit = workdir / f"{tag}.xml"
    junit.unlink(missing_ok=True)
    # a pytest.ini of its own: the child ignores the project's pytest options and conftest (hermetic rootdir)
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(prepared.path), *map(str, prepared.wheels), str(_repo_packages(workdir)), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["FASTNEST_PEER_PATCHED"] = "1" if patched else "0"
    if threads is not None:  # two suites side by side: one core each rather than both fighting for both
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the mixin's tests are local; nothing may reach the Hub
    cmd = [
        "timeout", "-k", "15", str(timeout_s),
        sys.executable, "-m", "pytest", str(CASES),
        "-c", str(ini), "--rootdir", str(workdir), "--noconftest", "-p", "no:cacheprovider", "--import-mode=importlib",
        "-q", "--tb=short", f"--junitxml={junit}",
        *(extra or []),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    if proc.returncode in (124, 137):
        raise RuntimeError(f"{tag} peer suite ran past {timeout_s}s:\n{output[-4000:]}")
    if not junit.exists():
        raise RuntimeError(f"{tag} peer suite wrote no junit XML (rc {proc.returncode}):\n{output[-4000:]}")
    return SuiteResult(parse_junit(junit), proc.returncode, output, seconds)
