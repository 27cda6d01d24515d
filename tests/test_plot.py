"""Figures with matplotlib: the plotted data are the inputs written here by hand; files are real PNG/SVG; the
``fastnest plot`` command's outputs and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from fastnest.train import figures
from fastnest.train.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A hand-written analysis report (the schema fastnest analyze writes): 2 types, 3 scales.
SUMMARY = {
    "scales": [1, 9, 36],
    "num_samples": 6,
    "types": {
        "fine": {
            "n": 4,
            "accuracy": {"1": 0.25, "9": 0.5, "36": 1.0},
            "oracle_accuracy": 1.0,
            "oracle_mean_tokens": 20.5,
        },
        "global": {
            "n": 2,
            "accuracy": {"1": 1.0, "9": 1.0, "36": 0.5},
            "oracle_accuracy": 1.0,
            "oracle_mean_tokens": 1.0,
        },
    },
    "all": {
        "n": 6,
        "accuracy": {"1": 0.5, "9": 2 / 3, "36": 5 / 6},
        "oracle_accuracy": 1.0,
        "oracle_mean_tokens": 14.0,
    },
}

# Hand-written metrics.jsonl records: step 3 lacks scale 36 (a gap, not a zero), step 4 was skipped.
RECORDS = [
    {"step": 1, "loss": 6.0, "scale_losses": {"1": 7.0, "9": 6.0, "36": 5.0}, "lr": {"lm": 1e-3}},
    {"step": 2, "loss": 4.0, "scale_losses": {"1": 5.0, "9": 4.0, "36": 3.0}, "lr": {"lm": 1e-3}},
    {"step": 3, "loss": 3.5, "scale_losses": {"1": 4.0, "9": 3.0}, "lr": {"lm": 1e-3}},
    {"step": 4, "loss": 2.0, "scale_losses": {"1": 3.0, "9": 2.0, "36": 1.0}, "skipped": True},
]


def _lines(fig) -> dict:
    (ax,) = fig.axes
    return {line.get_label(): line for line in ax.get_lines()}


def _xy(line) -> tuple[list, list]:
    return np.asarray(line.get_xdata(), float).tolist(), np.asarray(line.get_ydata(), float).tolist()


def _run(tmp_path: Path, metrics: bool = True, report: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    if metrics:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    if report:
        (run / "report.json").write_text(json.dumps(SUMMARY))
    return run


def test_analysis_figure_plots_the_report():
    fig = figures.analysis_figure(SUMMARY)
    lines = _lines(fig)
    assert _xy(lines["fine (n=4)"]) == ([1, 9, 36], [25.0, 50.0, 100.0])
    assert _xy(lines["global (n=2)"]) == ([1, 9, 36], [100.0, 100.0, 50.0])
    x, y = _xy(lines["all (n=6)"])
    assert x == [1, 9, 36] and y == pytest.approx([50.0, 200 / 3, 500 / 6])
    assert lines["all (n=6)"].get_linestyle() == "--"
    # every group's oracle point: (mean oracle tokens, oracle accuracy in %), drawn as a star
    assert _xy(lines["oracle: mean tokens, accuracy"]) == ([14.0], [100.0])
    assert _xy(lines["_oracle fine"]) == ([20.5], [100.0])
    assert _xy(lines["_oracle global"]) == ([1.0], [100.0])
    assert {lines[k].get_marker() for k in lines if "oracle" in k} == {"*"}
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert ax.get_xticks().tolist() == [1, 9, 36]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "9", "36"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "fine (n=4)",
        "global (n=2)",
        "all (n=6)",
        "oracle: mean tokens, accuracy",
    ]


def test_curves_figure_plots_every_scale_key_against_step():
    fig = figures.curves_figure(RECORDS)
    lines = _lines(fig)
    assert list(lines) == ["1", "9", "36", "training loss (all scales)"]  # numeric order, not "1" < "36" < "9"
    assert _xy(lines["1"]) == ([1, 2, 3, 4], [7.0, 5.0, 4.0, 3.0])
    assert _xy(lines["9"]) == ([1, 2, 3, 4], [6.0, 4.0, 3.0, 2.0])
    assert _xy(lines["36"]) == ([1, 2, 4], [5.0, 3.0, 1.0])
    assert _xy(lines["training loss (all scales)"]) == ([1, 2, 3, 4], [6.0, 4.0, 3.5, 2.0])
    assert fig.axes[0].get_yscale() == "log"


def test_curves_figure_keys_that_are_not_numbers_follow_the_numbers():
    records = [{"step": 1, "loss": 1.0, "scale_losses": {"m=2": 1.0, "64": 2.0, "4": 3.0}}]
    assert list(_lines(figures.curves_figure(records)))[:3] == ["4", "64", "m=2"]


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (760, 480)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    not_white = (pixels < 250).any(axis=1).mean()
    assert 0.02 < not_white < 0.6  # lines, text and axes drawn on a white page
    assert len(np.unique(pixels, axis=0)) > 20  # several colours, anti-aliased


def _check_svg(path: Path, *texts: str) -> None:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == "547.2pt" and root.get("height") == "345.6pt"  # 7.6 × 4.8 inches
    body = path.read_text()
    for text in texts:  # matplotlib writes each string as a comment beside its glyphs
        assert f"<!-- {text} -->" in body


def test_plot_command_writes_png_and_svg(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["plot", str(run), "--format", "both"]) == 0
    written = {Path(p).name for p in capsys.readouterr().out.split()}
    assert written == {"curves.png", "curves.svg", "report.png", "report.svg"}
    _check_png(run / "curves.png")
    _check_png(run / "report.png")
    _check_svg(run / "curves.svg", "step", "training loss (all scales)")
    _check_svg(run / "report.svg", "visual tokens (log scale)", "oracle: mean tokens, accuracy", "fine (n=4)")


def test_plot_output_file_and_directory(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["plot", str(run), "--output", str(tmp_path / "figs" / "loss.svg")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["loss-analysis.svg", "loss.svg"]
    _check_svg(tmp_path / "figs" / "loss-analysis.svg", "fine (n=4)")
    assert main(["plot", str(run), "--output", str(tmp_path / "dir")]) == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["curves.png", "report.png"]
    capsys.readouterr()
    assert main(["plot", str(run), "--output", str(tmp_path / "x.png"), "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path / 'x.png'} is a .png file but --format is svg" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_command_names_missing_files(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err
    run = _run(tmp_path, metrics=False, report=False)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: has neither metrics.jsonl" in err and "nor report.json" in err
    assert list(run.iterdir()) == []
    # an analysis output without training: its figure, and a note naming what is missing
    (run / "report.json").write_text(json.dumps(SUMMARY))
    assert main(["plot", str(run)]) == 0
    assert f"{run / 'metrics.jsonl'} not found: no training curves" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["report.json", "report.png"]


def test_plot_command_names_bad_files(tmp_path, capsys):
    run = _run(tmp_path)
    broken = {k: v for k, v in SUMMARY.items() if k != "all"}
    broken["types"] = {"fine": {**SUMMARY["types"]["fine"], "accuracy": {"1": 0.25, "9": 0.5}}}
    (run / "report.json").write_text(json.dumps(broken))
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'report.json'}: not an analysis report of fastnest analyze (missing all, fine.accuracy.36" in err
    (run / "report.json").write_text("{")
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'report.json'}: not JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}: no step records" in capsys.readouterr().err
    assert not (run / "curves.png").exists()


def test_save_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"x\.pdf: a figure is written as \.png or \.svg, not '\.pdf'"):
        figures.save(figures.curves_figure(RECORDS), tmp_path / "x.pdf")


def test_headless_without_pyplot(tmp_path):
    """A GUI backend requested by the environment and no display: the figures are still written, and pyplot
    (the user's global figure state) is never imported."""
    run = _run(tmp_path)
    code = (
        "import sys; from fastnest.train.plot import plot_run; "
        f"print(len(plot_run({str(run)!r}, 'both'))); print('matplotlib.pyplot' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "False"]
    _check_png(run / "report.png")
