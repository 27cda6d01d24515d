"""The two figures of a run, drawn with matplotlib: accuracy against visual tokens (the analysis report) and the
training loss per scale against step (``metrics.jsonl``).

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no GUI backend is ever
selected, nothing is registered in pyplot's global figure list, and a user's own pyplot state is left alone.
``Figure.savefig`` renders PNG with Agg and SVG with matplotlib's SVG backend, headless either way.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

FORMATS = ("png", "svg")
SIZE_INCHES, DPI = (7.6, 4.8), 100  # 760 × 480 pixels in PNG
ORACLE_MARKER = "*"


def _groups(summary: dict) -> list[tuple[str, dict]]:
    """The question types in report order, then ``all`` (unless ``all`` is the only group)."""
    groups = list(summary["types"].items())
    if [name for name, _ in groups] != ["all"]:
        groups.append(("all", summary["all"]))
    return groups


def scale_unit(summary: dict) -> str:
    """What the analysis's scales count (reports written before ``scale_unit`` was recorded: visual tokens)."""
    return summary.get("scale_unit", "visual tokens")


def analysis_figure(summary: dict) -> Figure:
    """Accuracy (%) against visual tokens on a log x axis ticked at the scales: a line per question type and a
    dashed black ``all`` line; each group's oracle is a star at (oracle mean tokens, oracle accuracy)."""
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    scales = sorted(summary["scales"])
    for i, (name, group) in enumerate(_groups(summary)):
        is_all = name == "all"
        colour = "black" if is_all else f"C{i}"
        acc = [100 * group["accuracy"][str(s)] for s in scales]
        ax.plot(scales, acc, "--" if is_all else "-", marker="o", color=colour, label=f"{name} (n={group['n']})")
        ax.plot(
            [group["oracle_mean_tokens"]],
            [100 * group["oracle_accuracy"]],
            ORACLE_MARKER,
            color=colour,
            markersize=16 if is_all else 11,
            markeredgecolor="white" if is_all else colour,
            # "_"-prefixed labels stay out of the legend; the "all" star stands for every oracle there.
            label="oracle: mean tokens, accuracy" if is_all else f"_oracle {name}",
            zorder=3,
        )
    unit = scale_unit(summary)
    token_axis(ax, scales, scales[-1], f"{unit} (log scale)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Accuracy against {unit} ({summary['num_samples']} samples)")
    fig.legend(loc="outside right upper")
    return fig


def token_axis(ax, scales: list[int], right: float, xlabel: str) -> None:
    """Accuracy (%) against visual tokens on a log axis ticked at ``scales`` only, up to ``right`` tokens."""
    ax.set_xscale("log")
    ax.set_xticks(scales, [str(s) for s in scales])
    ax.minorticks_off()  # the scales are the only meaningful positions
    ax.set_xlim(scales[0] / 1.6, right * 1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, color="0.9")


def _scale_order(key: str) -> tuple[int, float | str]:
    """Numeric scale keys by value, any other key after them by name."""
    try:
        return (0, float(key))
    except ValueError:
        return (1, key)


def curves_figure(records: list[dict], title: str = "Training loss per scale") -> Figure:
    """The loss of every scale in ``records``' ``scale_losses`` (whatever keys they hold: a scale missing from
    a record is a gap, not a zero) and the total training loss, against step, on a log y axis."""
    keys = sorted({k for r in records for k in r.get("scale_losses", {})}, key=_scale_order)
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for i, key in enumerate(keys):
        points = [(r["step"], r["scale_losses"][key]) for r in records if key in r.get("scale_losses", {})]
        colour = colormaps["viridis"](0.9 * i / max(len(keys) - 1, 1))  # viridis' top is too pale on white
        ax.plot(*zip(*points), color=colour, linewidth=1.2, label=key)
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], "--", color="black", linewidth=1.2, label="training loss (all scales)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.grid(True, which="major", color="0.9")
    ax.set_title(title)
    fig.legend(loc="outside right upper", title="visual tokens" if keys else None)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` in the format its suffix names (``.png`` or ``.svg``)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: a figure is written as {' or '.join('.' + f for f in FORMATS)}, not {path.suffix!r}")
    fig.savefig(path, format=fmt)
    return path
