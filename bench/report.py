"""Ratio report for the step benchmark (printed at the end of ``pytest bench/``)."""

from __future__ import annotations

TARGETS = {"released_loop": 0.25, "vanilla": 0.9}  # fastnest time must be at most this fraction of each


def summary_lines(results: dict[str, dict[str, float]]) -> list[str]:
    if "fastnest" not in results:
        return []
    fast = results["fastnest"]
    lines = ["", "fastnest all-scale step vs. alternatives (same weights and batch, this run):"]
    lines.append(f"  {'variant':<14}{'median s':>10}{'peak MiB':>10}{'time ratio':>12}{'mem ratio':>11}  target")
    for name, r in results.items():
        t_ratio, m_ratio = fast["median_s"] / r["median_s"], fast["peak_bytes"] / max(r["peak_bytes"], 1)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x: {'met' if t_ratio <= target else 'NOT met'}"
        lines.append(
            f"  {name:<14}{r['median_s']:>10.3f}{r['peak_bytes'] / 2**20:>10.0f}{t_ratio:>11.2f}x{m_ratio:>10.2f}x  {verdict}"
        )
    return lines
