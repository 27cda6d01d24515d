"""Collects per-variant timings and prints ratios measured side by side in one run."""

from __future__ import annotations

RESULTS: dict[str, dict[str, float]] = {}


def pytest_terminal_summary(terminalreporter):
    from bench.report import summary_lines

    for line in summary_lines(RESULTS):
        terminalreporter.write_line(line)
