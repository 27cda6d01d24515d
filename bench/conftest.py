"""Collects per-variant timings and prints ratios measured side by side in one run."""

from __future__ import annotations

RESULTS: dict[str, dict[str, float]] = {}
PREFIX_RESULTS: dict[str, dict[str, float]] = {}  # "<attention>/<shared|unshared|paired>" -> figures


def pytest_terminal_summary(terminalreporter):
    from bench.report import prefix_lines, summary_lines

    for line in summary_lines(RESULTS) + prefix_lines(PREFIX_RESULTS):
        terminalreporter.write_line(line)
