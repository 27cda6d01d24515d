"""Collects per-variant timings and prints ratios measured side by side in one run."""

from __future__ import annotations

from collections.abc import Callable

RESULTS: dict[str, dict[str, float]] = {}  # the step benchmark's variants (bench/report.py)
SUMMARIES: list[Callable[[], list[str]]] = []  # other benchmark modules' end-of-run reports


def pytest_terminal_summary(terminalreporter):
    from bench.report import summary_lines

    for line in summary_lines(RESULTS) + [line for summary in SUMMARIES for line in summary()]:
        terminalreporter.write_line(line)
