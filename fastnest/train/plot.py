"""``fastnest plot RUN_DIR``: a run's training curves (``metrics.jsonl``) and, when it has an analysis report
(``report.json``), its accuracy-against-visual-tokens figure, as PNG and/or SVG."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import figures, metrics
from .storage import check_output_dir

METRICS, REPORT = "metrics.jsonl", "report.json"
CURVES_STEM, ANALYSIS_STEM = "curves", "report"
SUMMARY_KEYS = ("scales", "num_samples", "types", "all")
GROUP_KEYS = ("n", "accuracy", "oracle_accuracy", "oracle_mean_tokens")


def plot_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastnest plot")
    p.description = (
        f"Draw a run's training loss per scale against step ({METRICS}) as {CURVES_STEM}.<format> and, when the run "
        f"has an analysis report ({REPORT}), accuracy against visual tokens as {ANALYSIS_STEM}.<format>."
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of fastnest train (or an analysis output)")
    p.add_argument("--format", choices=(*figures.FORMATS, "both"), help="default: png, or --output's suffix")
    p.add_argument(
        "--output",
        help="a directory (default: RUN_DIR), or FILE.png / FILE.svg: the training curves there and the analysis "
        "figure beside it as FILE-analysis.png / .svg",
    )
    return p


def _records(path: Path) -> list[dict]:
    records = metrics.read(path)
    if not records:
        raise ValueError(f"{path}: no step records; it fills as fastnest train runs its steps")
    bad = next((i for i, r in enumerate(records) if not {"step", "loss"} <= r.keys()), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad + 1} lacks 'step' or 'loss'; is this a fastnest train {METRICS}?")
    return records


def _summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); rewrite it with fastnest analyze") from e
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if not missing and not summary["scales"]:
        missing.append("scales (empty)")
    for g, group in {**summary.get("types", {}), "all": summary.get("all", {})}.items():
        missing += [f"{g}.{k}" for k in GROUP_KEYS if k not in group]
        if "accuracy" in group:
            missing += [f"{g}.accuracy.{s}" for s in summary.get("scales", ()) if str(s) not in group["accuracy"]]
    if missing:
        raise ValueError(f"{path}: not an analysis report of fastnest analyze (missing {', '.join(missing)})")
    return summary


def _targets(run: Path, output: str | None, fmt: str | None) -> tuple[Path, tuple[str, ...], str]:
    """(directory, formats, the file stem ``--output FILE`` names or "" for the default names)."""
    out = Path(output) if output else run
    suffix = out.suffix.lstrip(".").lower()
    if suffix in figures.FORMATS and not out.is_dir():  # a file name
        if fmt not in (None, suffix):
            raise ValueError(f"--output {out} is a .{suffix} file but --format is {fmt}; give a directory for {fmt}")
        return out.parent, (suffix,), out.stem
    formats = figures.FORMATS if fmt == "both" else (fmt or "png",)
    return out, formats, ""


def plot_run(run_dir: str | Path, fmt: str | None = None, output: str | None = None) -> list[Path]:
    """Draw the figures of ``run_dir`` (see the module docstring); return the files written."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory")
    metrics_path, report_path = run / METRICS, run / REPORT
    if not metrics_path.is_file() and not report_path.is_file():
        raise ValueError(
            f"{run}: has neither {METRICS} (written by fastnest train) nor {REPORT} (fastnest analyze); "
            "give a run directory"
        )
    out_dir, formats, file_stem = _targets(run, output, fmt)
    drawn = {}  # file stem -> figure
    if metrics_path.is_file():
        drawn[file_stem or CURVES_STEM] = figures.curves_figure(
            _records(metrics_path), f"Training loss per scale: {run.resolve().name}"
        )
    else:
        print(f"fastnest plot: {metrics_path} not found: no training curves", file=sys.stderr)
    if report_path.is_file():
        drawn[f"{file_stem}-analysis" if file_stem else ANALYSIS_STEM] = figures.analysis_figure(_summary(report_path))
    else:
        print(f"fastnest plot: {report_path} not found: no analysis figure", file=sys.stderr)
    check_output_dir(out_dir, "--output")
    return [figures.save(fig, out_dir / f"{stem}.{f}") for stem, fig in drawn.items() for f in formats]


def run_plot(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.format, args.output):
        print(path)
    return 0
