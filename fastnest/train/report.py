"""The analysis report: JSON for machines, Markdown for people, a PNG figure (accuracy vs. visual tokens)."""

from __future__ import annotations

import json
from pathlib import Path

from . import figures


def markdown(summary: dict, title: str = "Granularity analysis") -> str:
    """Table 2's shape: one row per scale (visual tokens), one column per question type, then the oracle."""
    types = list(summary["types"])
    cols = [*types, "all"] if types != ["all"] else ["all"]
    group = lambda c: summary["all"] if c == "all" else summary["types"][c]  # noqa: E731
    unit = figures.scale_unit(summary)
    head = f"| {unit} | " + " | ".join(f"{c} (n={group(c)['n']})" for c in cols) + " |"
    lines = [f"# {title}", "", head, "|" + "---|" * (len(cols) + 1)]
    for s in sorted(summary["scales"]):
        lines.append(f"| {s} | " + " | ".join(f"{100 * group(c)['accuracy'][str(s)]:.1f}" for c in cols) + " |")
    lines.append(
        "| oracle (mean tokens) | "
        + " | ".join(f"{100 * group(c)['oracle_accuracy']:.1f} ({group(c)['oracle_mean_tokens']:.1f})" for c in cols)
        + " |"
    )
    designed = any("designed_granularity" in group(c) for c in cols)
    lines.append(
        "| granularity: measured"
        + (" (designed)" if designed else "")
        + " | "
        + " | ".join(_granularity(group(c)) for c in cols)
        + " |"
    )
    lines += [
        "",
        f"Accuracy in %, {summary['num_samples']} samples. Scoring: {summary['scoring']}.",
        f"Oracle: {summary['oracle_definition']}.",
        f"Granularity: the fewest {unit} within 2 points of the type's best accuracy"
        + (" (designed: the scale the built-in data set built the type for)." if designed else "."),
        f"Evaluated with {summary['prefill_passes']} packed multi-scale prefill pass(es) in {summary['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def _granularity(group: dict) -> str:
    measured = "-" if group.get("granularity") is None else str(group["granularity"])
    return measured + (f" ({group['designed_granularity']})" if "designed_granularity" in group else "")


def write(summary: dict, out_dir: str | Path, stem: str = "report", title: str = "Granularity analysis") -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["md"].write_text(markdown(summary, title))
    figures.save(figures.analysis_figure(summary), paths["png"])
    return paths
