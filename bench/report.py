"""Ratio report for the step benchmark (printed at the end of ``pytest bench/``)."""

from __future__ import annotations

TARGETS = {"released_loop": 0.25, "vanilla": 0.9}  # fastnest time must be at most this fraction of each


def _verdict(ratio: float, target: float | None) -> str:
    return "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'NOT met'}"


def summary_lines(results: dict[str, dict[str, float]]) -> list[str]:
    if "fastnest" not in results:
        return []
    fast = results["fastnest"]
    lines = [
        "",
        "fastnest all-scale step vs. alternatives (same weights and batch, this run; ratio = fastnest / variant):",
        f"  {'variant':<14}{'median s':>9}{'min s':>8}{'peak MiB':>9}{'time (median)':>15}{'time (min)':>12}"
        f"{'memory':>8}",
    ]
    for name, r in results.items():
        if name == "paired":
            continue
        lines.append(
            f"  {name:<14}{r['median_s']:>9.3f}{r['min_s']:>8.3f}{r['peak_bytes'] / 2**20:>9.0f}"
            f"{fast['median_s'] / r['median_s']:>14.2f}x{fast['min_s'] / r['min_s']:>11.2f}x"
            f"{fast['peak_bytes'] / r['peak_bytes']:>7.2f}x"
        )
    lines.append("  targets:")
    if "released_loop" in results:
        ratio = fast["median_s"] / results["released_loop"]["median_s"]
        lines.append(f"    vs released_loop (medians): {ratio:.2f}x  {_verdict(ratio, TARGETS['released_loop'])}")
        same = abs(fast["loss"] - results["released_loop"]["loss"]) <= 1e-5 * abs(fast["loss"])
        lines.append(f"    same loss as the released loop: {'yes' if same else 'NO'}")
    if "vanilla" in results:
        ratio = fast["median_s"] / results["vanilla"]["median_s"]
        lines.append(f"    vs vanilla (medians): {ratio:.2f}x  {_verdict(ratio, TARGETS['vanilla'])}")
    if "paired" in results:
        paired = results["paired"]
        ratio = paired["fastnest/vanilla"]
        lines.append(
            f"    vs vanilla (median of {paired['pairs']} alternated pairs, drift cancels): {ratio:.2f}x  "
            f"{_verdict(ratio, TARGETS['vanilla'])}"
        )
    return lines


def loss_summary_lines(results: dict[tuple[int, str], dict[str, float]]) -> list[str]:
    """fused vs. logits_ce per vocabulary: seconds, peak MiB, and the fused/logits_ce ratios."""
    vocabs = sorted({v for v, name in results if (v, "fused") in results and (v, "logits_ce") in results})
    if not vocabs:
        return []
    lines = [
        "",
        "loss alone, T=2048 Hd=256 fp32 forward+backward, one step per fresh process (ratio = fused / logits_ce):",
        f"  {'vocab':>7}{'fused s':>9}{'logits s':>10}{'fused MiB':>11}{'logits MiB':>12}{'time':>7}{'memory':>8}"
        f"{'same loss':>11}",
    ]
    for vocab in vocabs:
        fused, plain = results[(vocab, "fused")], results[(vocab, "logits_ce")]
        same = abs(fused["loss"] - plain["loss"]) <= 1e-5 * abs(plain["loss"])
        lines.append(
            f"  {vocab:>7}{fused['seconds']:>9.2f}{plain['seconds']:>10.2f}{fused['peak_bytes'] / 2**20:>11.0f}"
            f"{plain['peak_bytes'] / 2**20:>12.0f}{fused['seconds'] / plain['seconds']:>6.2f}x"
            f"{fused['peak_bytes'] / plain['peak_bytes']:>7.2f}x{'yes' if same else 'NO':>11}"
        )
    return lines


PREFIX_TARGET = 0.95  # shared-prefix step time must be at most this fraction of the unshared one


def prefix_lines(results: dict[str, dict[str, float]]) -> list[str]:
    """Shared vs. unshared prefix, per attention backend measured (ratio = shared / unshared)."""
    attentions = dict.fromkeys(key.split("/")[0] for key in results)
    if not attentions:
        return []
    lines = [
        "",
        "shared vs. unshared prefix (35-token system prompt, ~100 text tokens; ratio = shared / unshared):",
        f"  {'attention':<10}{'shared s':>10}{'unshared s':>11}{'time (median)':>15}{'time (min)':>12}"
        f"{'memory':>8}{'pairs':>8}{'pairs CPU':>10}",
    ]
    for attention in attentions:
        shared, unshared = results.get(f"{attention}/shared"), results.get(f"{attention}/unshared")
        paired = results.get(f"{attention}/paired")
        if paired:
            ratio, how = paired["shared/unshared"], f"median of {paired['pairs']} alternated pairs"
        elif shared and unshared:
            ratio, how = shared["median_s"] / unshared["median_s"], "medians"
        else:
            continue
        line = f"  {attention:<10}"
        if shared and unshared:
            line += (
                f"{shared['median_s']:>10.3f}{unshared['median_s']:>11.3f}"
                f"{shared['median_s'] / unshared['median_s']:>14.3f}x{shared['min_s'] / unshared['min_s']:>11.3f}x"
                f"{shared['peak_bytes'] / unshared['peak_bytes']:>7.2f}x"
            )
        else:
            line += " " * 55
        line += f"{paired['shared/unshared']:>7.3f}x" if paired else " " * 8
        line += f"{paired['cpu shared/unshared']:>9.3f}x" if paired else " " * 10
        line += f"  {_verdict(ratio, PREFIX_TARGET)} ({how}, wall time)"
        if shared and unshared:
            line += f"; loss rel. difference {abs(shared['loss'] - unshared['loss']) / abs(unshared['loss']):.1e}"
        lines.append(line)
    return lines
