"""Static GPU report: every registered Triton kernel configuration compiled ahead of time for sm_80 and sm_90
(registers, spills, shared memory, tensor-core instructions), without a GPU.

Run from the repository root: ``python -m bench.static_report`` (exit status 1 if any configuration has a problem).
``--module NAME`` (repeatable) reports the modules named instead of tools.aot_configs.KERNEL_MODULES, e.g.
``--module tests.aot_samples``.
"""

from __future__ import annotations

import argparse
import sys
import time

from tools import aot, aot_configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="kernel module exposing aot_configs(arch)")
    parser.add_argument("--arch", action="append", type=int, choices=aot.ARCHS, help="default: all")
    args = parser.parse_args(argv)
    modules = args.module or aot_configs.KERNEL_MODULES
    archs = args.arch or aot.ARCHS
    jobs = [(config, arch) for arch in archs for name in modules for config in aot.module_configs(name, arch)]
    start = time.perf_counter()
    results = aot.compile_reports(jobs)
    elapsed = time.perf_counter() - start
    reports = [r for r in results if isinstance(r, aot.KernelReport)]
    errors = [r for r in results if isinstance(r, aot.AotError)]
    print(f"# Static GPU report: {', '.join(modules)}; sm_{', sm_'.join(map(str, archs))}\n")
    print(aot.format_reports(reports))
    for error in errors:
        print(f"\nERROR {error}")
    bad = [r for r in reports if not r.ok]
    print(
        f"\n{len(reports)} compiled in {elapsed:.1f} s (Triton's cache makes repeats fast), "
        f"{len(bad)} with problems, {len(errors)} failed to compile."
    )
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
