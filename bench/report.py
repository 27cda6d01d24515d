"""Ratio report for the step benchmark (printed at the end of ``pytest bench/``)."""

from __future__ import annotations

TARGETS = {"released_loop": 0.25, "vanilla": 0.9}  # fastnest time must be at most this fraction of each


def summary_lines(results: dict[str, dict[str, float]]) -> list[str]:
    if "fastnest" not in results:
        return []
    fast = results["fastnest"]
    lines = [
        "",
        "fastnest all-scale step vs. alternatives (same weights and batch, this run; ratio = fastnest / variant):",
        f"  {'variant':<14}{'median s':>9}{'min s':>8}{'peak MiB':>9}{'time (median)':>15}{'time (min)':>12}"
        f"{'memory':>8}  target",
    ]
    for name, r in results.items():
        ratio = fast["median_s"] / r["median_s"]
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'NOT met'}"
        lines.append(
            f"  {name:<14}{r['median_s']:>9.3f}{r['min_s']:>8.3f}{r['peak_bytes'] / 2**20:>9.0f}{ratio:>14.2f}x"
            f"{fast['min_s'] / r['min_s']:>11.2f}x{fast['peak_bytes'] / r['peak_bytes']:>7.2f}x  {verdict}"
        )
    if "released_loop" in results:
        same = abs(fast["loss"] - results["released_loop"]["loss"]) <= 1e-5 * abs(fast["loss"])
        lines.append(f"  same loss as the released loop: {'yes' if same else 'NO'}")
    return lines
