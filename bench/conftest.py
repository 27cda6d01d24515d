"""Collects per-variant timings and prints ratios measured side by side in one run."""

from __future__ import annotations

RESULTS: dict[str, dict[str, float]] = {}
LOSS_RESULTS: dict[tuple[int, str], dict[str, float]] = {}  # (vocab, variant) -> peak_bytes, seconds, loss


def pytest_terminal_summary(terminalreporter):
    from bench.report import loss_summary_lines, summary_lines

    for line in summary_lines(RESULTS) + loss_summary_lines(LOSS_RESULTS):
        terminalreporter.write_line(line)
