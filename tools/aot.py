"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU, and a resource report per kernel.

tools/aot_configs.py lists, per Triton kernel module of fastnest/ops (``KERNEL_MODULES``), every configuration its
launcher can choose; another module (e.g. tests.aot_samples) may expose ``aot_configs(arch) -> list[AotConfig]``. ``compile_reports`` compiles them with Triton's bundled ptxas and reads
registers, spills (stack / local memory, STL/LDL instructions), shared memory and tensor-core instructions (HMMA on
sm_80, HGMMA = wgmma on sm_90) out of the cubin with Triton's bundled cuobjdump.

Under ``TRITON_INTERPRET=1`` (the tests on a machine without CUDA) ``@triton.jit`` yields interpreter functions that
cannot be compiled, so compilation runs in child processes without that variable, which re-import the kernels (by
module and name); they also compile in parallel.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ARCHS = (80, 90)
# Shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin), CUDA programming guide,
# "Technical Specifications per Compute Capability": 163 KB on 8.0 (A100), 227 KB on 9.0 (H100).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The tensor-core instruction a GEMM must use: mma.sync on Ampere, warpgroup wgmma on Hopper.
MMA_INSTRUCTION = {80: "HMMA", 90: "HGMMA"}


class AotError(RuntimeError):
    """A configuration that could not be compiled or inspected."""


@dataclass(frozen=True)
class AotConfig:
    """One launch configuration of a Triton kernel, as its dispatcher would launch it.

    ``signature`` maps every runtime argument to a Triton type string ("*bf16", "i32", "fp32", ...); ``constexprs``
    maps the ``tl.constexpr`` arguments and any integer argument that is 1 at run time (unit strides: the JIT turns
    those into constants, which is what lets it vectorize and pipeline loads) to its value. ``aligned`` names the
    arguments the JIT sees as divisible by 16 (pointers of fresh tensors, strides/sizes that are multiples of 16);
    None means every pointer argument.
    """

    name: str
    fn: Any  # triton.runtime.JITFunction, or the interpreter's function under TRITON_INTERPRET
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    is_gemm: bool = False
    aligned: tuple[str, ...] | None = None


@dataclass(frozen=True)
class KernelReport:
    """What one configuration compiled to on one architecture, and what is wrong with it (``problems()``)."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int  # per-thread stack frame: register spills land here
    local_bytes: int  # other per-thread local memory
    local_ops: int  # STL/LDL instructions in the SASS
    shared_bytes: int  # dynamic (Triton's metadata.shared, what it launches with) + static (ptxas)
    smem_limit: int
    is_gemm: bool
    hmma: int  # HMMA instructions (mma.sync) in the SASS
    hgmma: int  # HGMMA instructions (wgmma) in the SASS
    compile_s: float  # 0 when Triton's own cache already held the kernel

    @property
    def mma_instruction(self) -> str:
        return MMA_INSTRUCTION[self.arch]

    @property
    def mma_count(self) -> int:
        return self.hgmma if self.arch >= 90 else self.hmma

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0 or self.local_ops > 0

    def problems(self) -> list[str]:
        found = []
        if self.spills:
            found.append(
                f"spills to local memory (stack {self.stack_bytes} B, local {self.local_bytes} B, "
                f"{self.local_ops} STL/LDL)"
            )
        if self.shared_bytes > self.smem_limit:
            found.append(f"shared memory {self.shared_bytes} B > sm_{self.arch} limit {self.smem_limit} B")
        if self.is_gemm and self.mma_count == 0:
            found.append(
                f"GEMM without {self.mma_instruction} on sm_{self.arch} (HMMA {self.hmma}, HGMMA {self.hgmma})"
            )
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


def module_configs(module_name: str, arch: int) -> list[AotConfig]:
    """The configurations of one kernel module: registered in tools/aot_configs.py, else its ``aot_configs(arch)``."""
    from tools.aot_configs import KERNEL_CONFIGS

    if module_name in KERNEL_CONFIGS:
        return KERNEL_CONFIGS[module_name](arch)
    return importlib.import_module(module_name).aot_configs(arch)


def registered_configs(arch: int) -> list[AotConfig]:
    """Every configuration of every registered kernel module (tools/aot_configs.py) for ``arch``."""
    from tools.aot_configs import KERNEL_MODULES

    return [config for module_name in KERNEL_MODULES for config in module_configs(module_name, arch)]


def compile_report(config: AotConfig, arch: int) -> KernelReport:
    """Compile one configuration for ``sm_<arch>`` and report its resources; raises AotError if it cannot."""
    (result,) = compile_reports([(config, arch)])
    if isinstance(result, AotError):
        raise result
    return result


def compile_reports(jobs: Sequence[tuple[AotConfig, int]], workers: int | None = None) -> list[KernelReport | AotError]:
    """One report, or the error that prevented it, per (config, arch): one broken kernel does not hide the others.

    Compiles in ``workers`` child processes (default: one per CPU; ptxas is single-threaded), or in this process
    when one worker suffices and the kernels are compiled JIT functions (not the interpreter's, TRITON_INTERPRET).
    """
    for _, arch in jobs:
        if arch not in SMEM_LIMIT:
            raise ValueError(f"arch {arch!r} is not supported; expected one of {sorted(SMEM_LIMIT)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers or cpus, len(jobs))
    from triton.runtime.jit import JITFunction

    if workers <= 1 and all(isinstance(config.fn, JITFunction) for config, _ in jobs):
        return [_try_compile(config, arch) for config, arch in jobs]
    return _compile_in_children(jobs, workers)


def format_reports(reports: Sequence[KernelReport]) -> str:
    """A Markdown table, one row per report."""
    header = (
        "| kernel | arch | warps | stages | regs | spill (stack/local B, STL+LDL) | smem B / limit | "
        "MMA (HMMA/HGMMA) | compile s | status |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in reports:
        mma = f"{r.hmma}/{r.hgmma}" + ("" if r.is_gemm else " (not a GEMM)")
        lines.append(
            f"| {r.name} | sm_{r.arch} | {r.num_warps} | {r.num_stages} | {r.registers} | "
            f"{r.stack_bytes}/{r.local_bytes}, {r.local_ops} | {r.shared_bytes} / {r.smem_limit} | {mma} | "
            f"{r.compile_s:.2f} | {'ok' if r.ok else '; '.join(r.problems())} |"
        )
    return "\n".join(lines)


def _try_compile(config: AotConfig, arch: int) -> KernelReport | AotError:
    try:
        return _compile(config, arch)
    except Exception as e:  # a report per config: one broken kernel must not hide the others
        return AotError(f"{config.name} (sm_{arch}): {type(e).__name__}: {e}")


def _compile(config: AotConfig, arch: int) -> KernelReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = config.fn
    for name in [*config.signature, *config.constexprs, *(config.aligned or ())]:
        if name not in fn.arg_names:
            raise ValueError(f"{config.name}: {name!r} is not an argument of {fn.__name__}; arguments: {fn.arg_names}")
    missing = [name for name in fn.arg_names if name not in config.signature and name not in config.constexprs]
    if missing:
        raise ValueError(f"{config.name}: arguments {missing} are neither in signature nor in constexprs")
    signature = {name: config.signature.get(name, "constexpr") for name in fn.arg_names}
    aligned = config.aligned
    if aligned is None:
        aligned = tuple(name for name, ty in config.signature.items() if ty.startswith("*"))
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn, signature, dict(config.constexprs), attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    compile_s = time.perf_counter() - start
    usage, sass = _inspect_cubin(compiled.asm["cubin"])
    return KernelReport(
        name=config.name,
        arch=arch,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        registers=usage["REG"],
        stack_bytes=usage["STACK"],
        local_bytes=usage["LOCAL"],
        local_ops=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        shared_bytes=compiled.metadata.shared + usage["SHARED"],
        smem_limit=SMEM_LIMIT[arch],
        is_gemm=config.is_gemm,
        hmma=len(re.findall(r"\bHMMA\.", sass)),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)),
        compile_s=compile_s,
    )


def _inspect_cubin(cubin: bytes) -> tuple[dict[str, int], str]:
    """Resource usage (REG, STACK, SHARED, LOCAL, ...) and SASS text of a single-kernel cubin."""
    from triton import knobs

    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        raise AotError(
            "cuobjdump not found: it ships with Triton in triton/backends/nvidia/bin (or set TRITON_CUOBJDUMP_PATH)"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "-res-usage", "-sass", path], capture_output=True, text=True, check=True)
    match = re.search(r"^\s*(REG:\d+ .*)$", out.stdout, re.MULTILINE)
    if match is None:
        raise AotError(f"no resource usage line in cuobjdump output:\n{out.stdout[:2000]}")
    usage = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}
    return usage, out.stdout


# Child-process compilation: configs travel as JSON, kernels as (module, qualified name) re-imported there.


def _encode_value(config_name: str, key: str, value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"{config_name}: constexpr {key}={value!r} cannot be sent to the compile process; "
        "allowed: bool, int, float, str, None, tl.dtype"
    )


def _decode_value(value: Any) -> Any:
    import triton.language as tl

    return tl.dtype(value["tl_dtype"]) if isinstance(value, dict) else value


def _encode_job(config: AotConfig, arch: int) -> dict[str, Any]:
    raw = getattr(config.fn, "fn", None)
    if raw is None or "<locals>" in raw.__qualname__:
        raise ValueError(f"{config.name}: the kernel must be a module-level @triton.jit function to compile it AOT")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "fn"}
    fields["constexprs"] = {k: _encode_value(config.name, k, v) for k, v in config.constexprs.items()}
    fields["signature"] = dict(config.signature)
    return {"module": raw.__module__, "qualname": raw.__qualname__, "arch": arch, "config": fields}


def _decode_job(job: dict[str, Any]) -> tuple[AotConfig, int]:
    fn: Any = importlib.import_module(job["module"])
    for part in job["qualname"].split("."):
        fn = getattr(fn, part)
    fields = dict(job["config"])
    fields["constexprs"] = {k: _decode_value(v) for k, v in fields["constexprs"].items()}
    if fields["aligned"] is not None:
        fields["aligned"] = tuple(fields["aligned"])
    return AotConfig(fn=fn, **fields), job["arch"]


def _compile_in_children(jobs: Sequence[tuple[AotConfig, int]], workers: int) -> list[KernelReport | AotError]:
    encoded = [_encode_job(config, arch) for config, arch in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The children must import the kernels' modules from the same places as this process (tests/, a worktree).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    results: list[KernelReport | AotError | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for worker in range(workers):
            indices = range(worker, len(jobs), workers)  # round robin spreads the slow configurations
            paths = [os.path.join(tmp, f"{worker}.{ext}") for ext in ("in.json", "out.json", "err.txt")]
            with open(paths[0], "w") as f:
                json.dump([encoded[i] for i in indices], f)
            with open(paths[2], "w") as err:  # files, not pipes: kernel imports may print, and nothing can block
                command = [sys.executable, "-m", "tools.aot", paths[0], paths[1]]
                children.append((indices, paths, subprocess.Popen(command, stdout=err, stderr=err, env=env)))
        failures = []
        for indices, paths, child in children:
            if child.wait() != 0:
                with open(paths[2]) as f:
                    failures.append(f"AOT compile process failed (exit {child.returncode}):\n{f.read()[-4000:]}")
                continue
            with open(paths[1]) as f:
                for i, item in zip(indices, json.load(f)):
                    results[i] = AotError(item["error"]) if "error" in item else KernelReport(**item["report"])
    if failures:
        raise AotError("\n".join(failures))
    return [r for r in results if r is not None]


def _serve(in_path: str, out_path: str) -> None:
    """Child side: JSON jobs from ``in_path``, one {"report": ...} or {"error": ...} per job into ``out_path``."""
    with open(in_path) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        try:
            config, arch = _decode_job(job)
        except Exception as e:
            results.append({"error": f"{job['config']['name']}: cannot load {job['qualname']}: {e!r}"})
            continue
        result = _try_compile(config, arch)
        results.append(
            {"error": str(result)} if isinstance(result, AotError) else {"report": dataclasses.asdict(result)}
        )
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
