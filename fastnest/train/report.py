"""The analysis report: JSON for machines, Markdown for people, a PNG plot (accuracy vs. visual tokens)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def markdown(summary: dict, title: str = "Granularity analysis") -> str:
    """Table 2's shape: one row per scale (visual tokens), one column per question type, then the oracle."""
    types = list(summary["types"])
    cols = [*types, "all"] if types != ["all"] else ["all"]
    group = lambda c: summary["all"] if c == "all" else summary["types"][c]  # noqa: E731
    head = "| visual tokens | " + " | ".join(f"{c} (n={group(c)['n']})" for c in cols) + " |"
    lines = [f"# {title}", "", head, "|" + "---|" * (len(cols) + 1)]
    for s in sorted(summary["scales"]):
        lines.append(f"| {s} | " + " | ".join(f"{100 * group(c)['accuracy'][str(s)]:.1f}" for c in cols) + " |")
    lines.append(
        "| oracle (mean tokens) | "
        + " | ".join(f"{100 * group(c)['oracle_accuracy']:.1f} ({group(c)['oracle_mean_tokens']:.1f})" for c in cols)
        + " |"
    )
    lines += [
        "",
        f"Accuracy in %, {summary['num_samples']} samples. Scoring: {summary['scoring']}.",
        f"Oracle: {summary['oracle_definition']}.",
        f"Evaluated with {summary['prefill_passes']} packed multi-scale prefill pass(es) in {summary['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
]


def plot(summary: dict, path: str | Path, size: tuple[int, int] = (760, 480)) -> None:
    """Accuracy (%) against visual tokens on a log x axis: one line per question type, ``all`` dashed-black,
    the oracle as a star at (mean tokens, accuracy)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 70, 190, 30, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    scales = sorted(summary["scales"])
    lo, hi = math.log(min(scales)) - 0.3, math.log(max(scales)) + 0.3
    x = lambda t: left + (math.log(t) - lo) / (hi - lo) * (w - left - right)  # noqa: E731
    y = lambda a: top + (1 - a) * (h - top - bottom)  # noqa: E731
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        draw.line([left, y(a), w - right, y(a)], fill=(225, 225, 225))
        draw.text((left - 40, y(a) - 6), f"{int(a * 100)}%", fill="black", font=font)
    for s in scales:
        draw.line([x(s), h - bottom, x(s), h - bottom + 5], fill="black")
        draw.text((x(s) - 8, h - bottom + 8), str(s), fill="black", font=font)
    draw.text(((left + w - right) / 2 - 70, h - 25), "visual tokens (log scale)", fill="black", font=font)
    draw.text((10, 8), "accuracy vs. visual tokens", fill="black", font=font)

    series = [(t, g, PALETTE[i % len(PALETTE)]) for i, (t, g) in enumerate(summary["types"].items())]
    if len(series) != 1 or series[0][0] != "all":
        series.append(("all", summary["all"], (0, 0, 0)))
    for row, (name, group, colour) in enumerate(series):
        pts = [(x(s), y(group["accuracy"][str(s)])) for s in scales]
        draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 10 + 18 * row
        draw.line([w - right + 15, ly, w - right + 40, ly], fill=colour, width=2)
        draw.text((w - right + 46, ly - 6), name, fill="black", font=font)
    oracle = summary["all"]
    ox, oy = x(max(min(scales), oracle["oracle_mean_tokens"])), y(oracle["oracle_accuracy"])
    _star(draw, ox, oy, 8, (200, 0, 0))
    ly = top + 10 + 18 * len(series)
    _star(draw, w - right + 27, ly, 6, (200, 0, 0))
    draw.text((w - right + 46, ly - 6), "oracle (all)", fill="black", font=font)
    img.save(path)


def _star(draw, cx: float, cy: float, r: float, colour) -> None:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    draw.polygon(pts, fill=colour)


def write(summary: dict, out_dir: str | Path, stem: str = "report", title: str = "Granularity analysis") -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["md"].write_text(markdown(summary, title))
    plot(summary, paths["png"])
    return paths
