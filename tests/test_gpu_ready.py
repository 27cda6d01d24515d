"""GPU readiness without a GPU: every registered Triton kernel configuration compiles ahead of time for sm_80 and
sm_90 without register spills, within the shared memory a block may use, and GEMMs on tensor cores (HMMA on sm_80,
HGMMA = wgmma on sm_90). Sample kernels (tests/aot_samples.py) show each check passing and failing.

Under TRITON_INTERPRET (no CUDA) the compilation runs in child processes without it (tools/aot.py). The
registered kernels take minutes to compile on 2 cold cores (Triton's cache makes repeats fast): marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import fastnest.ops
from tests import aot_samples
from tools import aot, aot_configs

# 2 buffers of a 64x512 and a 512x64 bf16 tile (256 KiB) exceed sm_90's 227 KiB; 8 warps keep it spill-free there.
SMEM_OVERFLOW = aot_samples.matmul_config("sample_matmul_smem_overflow", 64, 64, 512, num_warps=8, num_stages=3)
# 32 rows are fewer than a warpgroup MMA's 64: sm_90 falls back to HMMA.
ROWS_32 = aot_samples.matmul_config("sample_matmul_32_rows", 32, 64, 32, num_warps=4, num_stages=3)
# "nope" is no argument of the kernel: must come back as an error, not a report.
BAD_SIGNATURE = aot.AotConfig("sample_bad_signature", aot_samples.gelu_kernel, {"x_ptr": "*bf16", "nope": "i32"})
SAMPLE_JOBS = [
    (config, arch)
    for arch in (80, 90)
    for config in [*aot_samples.aot_configs(arch), aot_samples.spilling_config(), ROWS_32, BAD_SIGNATURE]
] + [(SMEM_OVERFLOW, 90)]
REGISTERED_JOBS = [(config, arch) for arch in aot.ARCHS for config in aot.registered_configs(arch)]


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, int], aot.KernelReport | aot.AotError]:
    """The sample configurations, compiled in one batch."""
    return {
        (config.name, arch): result for (config, arch), result in zip(SAMPLE_JOBS, aot.compile_reports(SAMPLE_JOBS))
    }


@pytest.fixture(scope="module")
def registered_reports() -> dict[tuple[str, int], aot.KernelReport | aot.AotError]:
    """Every registered configuration for both architectures, compiled in one batch (minutes on 2 cold cores)."""
    results = aot.compile_reports(REGISTERED_JOBS)
    return {(config.name, arch): result for (config, arch), result in zip(REGISTERED_JOBS, results)}


def _report(reports, name: str, arch: int) -> aot.KernelReport:
    result = reports[name, arch]
    if isinstance(result, aot.AotError):
        raise result
    return result


def test_registry_lists_every_triton_kernel_module():
    ops = Path(fastnest.ops.__file__).parent
    on_disk = {f"fastnest.ops.{path.parent.name}.triton" for path in ops.glob("*/triton.py")}
    assert set(aot_configs.KERNEL_MODULES) == on_disk
    for arch in aot.ARCHS:
        names = [config.name for config in aot.registered_configs(arch)]
        assert len(names) == len(set(names)), f"duplicate config names for sm_{arch}: {names}"
        assert not set(names) & {config.name for config, _ in SAMPLE_JOBS}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), [(config.name, arch) for config, arch in REGISTERED_JOBS], ids=str)
def test_registered_kernel_is_gpu_ready(registered_reports, name, arch):
    report = _report(registered_reports, name, arch)
    assert report.problems() == [], aot.format_reports([report])
    assert not report.spills and report.shared_bytes <= aot.SMEM_LIMIT[arch]
    if report.is_gemm:  # tensor cores: mma.sync on sm_80, warpgroup wgmma on sm_90
        assert (report.hgmma if arch == 90 else report.hmma) > 0


@pytest.mark.parametrize("arch", [80, 90])
def test_sample_gemm_uses_tensor_cores_without_spills(reports, arch):
    report = _report(reports, "sample_matmul_bias_128x128x64", arch)
    assert report.ok, report.problems()
    assert report.stack_bytes == report.local_bytes == report.local_ops == 0
    assert 0 < report.registers <= 255
    # sm_80: mma.sync only; sm_90: the 128x128 tile on 8 warps is two warpgroups of wgmma.
    assert (report.hmma > 0, report.hgmma > 0) == ((True, False) if arch == 80 else (False, True))
    # At least one stage of the 128x64 and 64x128 bf16 operand tiles lives in shared memory.
    assert report.shared_bytes >= (128 * 64 + 64 * 128) * 2


@pytest.mark.parametrize("arch", [80, 90])
def test_sample_elementwise_kernel_has_no_mma(reports, arch):
    report = _report(reports, "sample_gelu_1024", arch)
    assert report.ok and not report.is_gemm
    assert report.hmma == report.hgmma == 0


@pytest.mark.parametrize("arch", [80, 90])
def test_spilling_config_is_reported(reports, arch):
    # One warp holding a 128x64 fp32 accumulator needs 256 registers per thread for it alone; at most 255 exist.
    report = _report(reports, "sample_matmul_one_warp_spills", arch)
    assert report.spills and report.stack_bytes > 0 and report.local_ops > 0
    assert any("spills" in problem for problem in report.problems())
    assert not report.ok


def test_shared_memory_overflow_is_reported(reports):
    report = _report(reports, "sample_matmul_smem_overflow", 90)
    assert report.shared_bytes > aot.SMEM_LIMIT[90] == 232448
    assert report.problems() == [f"shared memory {report.shared_bytes} B > sm_90 limit 232448 B"]


def test_gemm_without_warpgroup_mma_is_reported(reports):
    assert _report(reports, "sample_matmul_32_rows", 80).ok
    report = _report(reports, "sample_matmul_32_rows", 90)
    assert report.hmma > 0 and report.hgmma == 0
    assert report.problems() == [f"GEMM without HGMMA on sm_90 (HMMA {report.hmma}, HGMMA 0)"]


def test_bad_config_comes_back_as_error(reports):
    for arch in (80, 90):
        error = reports["sample_bad_signature", arch]
        assert isinstance(error, aot.AotError) and "'nope' is not an argument of gelu_kernel" in str(error)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="arch 75"):
        aot.compile_report(ROWS_32, 75)
