"""Collects per-variant timings and prints ratios measured side by side in one run."""

from __future__ import annotations

from collections.abc import Callable

RESULTS: dict[str, dict[str, float]] = {}  # the step benchmark's variants (bench/report.py)
LOSS_RESULTS: dict[tuple[int, str], dict[str, float]] = {}  # (vocab, variant) -> peak_bytes, seconds, loss
PREFIX_RESULTS: dict[str, dict[str, float]] = {}  # "<attention>/<shared|unshared|paired>" -> figures
SUMMARIES: list[Callable[[], list[str]]] = []  # other benchmark modules' end-of-run reports


def pytest_terminal_summary(terminalreporter):
    from bench.report import loss_summary_lines, prefix_lines, summary_lines

    extra = [line for summary in SUMMARIES for line in summary()]
    for line in summary_lines(RESULTS) + loss_summary_lines(LOSS_RESULTS) + prefix_lines(PREFIX_RESULTS) + extra:
        terminalreporter.write_line(line)
