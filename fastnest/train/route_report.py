"""``fastnest route``'s report: ``report.json``, ``report.md`` (the side-by-side table, the target figures, the
cost of a routed answer) and ``report.png`` (accuracy against mean visual tokens, log x axis)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from . import figures


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(result: dict, title: str) -> str:
    cmp = result["comparison"]
    lines = [f"# {title}", "", f"Held-out split: {cmp['num_samples']} samples. {result['splits']}", ""]
    lines += ["| method | setting | accuracy (%) | mean visual tokens | gap closed (%) |", "|---|---|---|---|---|"]
    for p in cmp["fixed"]:
        lines.append(f"| fixed | {p['scale']} tokens | {_pct(p['accuracy'])} | {p['tokens']:.1f} | |")
    for p in cmp.get("cascade", []):
        lines.append(
            f"| cascade | confidence < {p['threshold']:g} escalates | {_pct(p['accuracy'])} | {p['tokens']:.1f} | |"
        )
    for p in cmp["router_sweep"]:
        lines.append(
            f"| router | budget {p['budget']:g} | {_pct(p['accuracy'])} | {p['tokens']:.1f} | {_pct(p['gap_closed'])} |"
        )
    r = cmp["router"]
    lines.append(
        f"| **router** | **its budget {r['budget']:g}** | **{_pct(r['accuracy'])}** | **{r['tokens']:.1f}** | "
        f"**{_pct(r['gap_closed'])}** |"
    )
    o = cmp["oracle"]
    lines.append(f"| oracle | per sample | {_pct(o['accuracy'])} | {o['tokens']:.1f} | 100 |")
    t = cmp["targets"]
    best = t["best_fixed"]
    ratio = "not reached" if t["token_ratio"] is None else f"{t['token_ratio']:.2f}×"
    reach = t["router_tokens_at_best_fixed_accuracy"]
    reach = "—" if reach is None else f"{reach:.1f}"
    lines += [
        "",
        "Mean visual tokens per image count every pass: the cascade's every scale tried, the router's routing pass "
        f"({cmp['scales'][0]} tokens) plus its choice. Gap closed: (accuracy − fixed-scale frontier at those tokens) "
        "/ (oracle accuracy − frontier); the frontier is the best fixed scale with at most those tokens, "
        "interpolated in log tokens.",
        "",
        "## Targets",
        "",
        f"- Best fixed scale: {best['scale']} tokens, {_pct(best['accuracy'])}%. Router's fewest mean tokens reaching "
        f"it: {reach} = {ratio} its tokens (target ≤ 0.5×: {'met' if t['token_ratio_met'] else 'not met'}).",
        f"- Gap closed at the router's budget {r['budget']:g} (chosen out of fold on the routing-train split): "
        f"{_pct(t['gap_closed'])}% (target ≥ 50%: {'met' if t['gap_closed_met'] else 'not met'}); the sweep's "
        f"largest, at budget {t['gap_closed_best_budget']} (chosen on the held-out split): "
        f"{_pct(t['gap_closed_best_in_sweep'])}%.",
    ]
    if "greedy_agreement" in cmp:
        lines.append(
            f"- Greedy decoding (the cascade's answers) agrees with the teacher-forced score on "
            f"{_pct(cmp['greedy_agreement'])}% of (sample, scale) pairs."
        )
    lines += ["", f"## By question type (router at budget {r['budget']:g})", ""]
    scales = cmp["scales"]
    lines += [
        "| type | n | " + " | ".join(f"{s}" for s in scales) + " | router (tokens) | oracle (tokens) |",
        "|---|---|" + "---|" * (len(scales) + 2),
    ]
    for name, g in cmp["by_type"].items():
        lines.append(
            f"| {name} | {g['n']} | "
            + " | ".join(_pct(g["fixed"][str(s)]) for s in scales)
            + f" | {_pct(g['router']['accuracy'])} ({g['router']['tokens']:.1f}) | "
            f"{_pct(g['oracle']['accuracy'])} ({g['oracle']['tokens']:.1f}) |"
        )
    if "cost" in result:
        c, per = result["cost"], result["cost"]["per_answer"]
        lines += [
            "",
            f"## Cost of a routed answer (routing pass + chosen pass) against the fixed {c['largest']}-token pass",
            "",
            f"{c['answers']} held-out prompts, batch {c['batch_size']}, greedy, at most {c['max_new_tokens']} new "
            f"tokens, budget {c['budget']:g}; median of {c['repeats']} alternating runs per batch.",
            "",
            "| per answer | fixed | routed |",
            "|---|---|---|",
            f"| visual tokens | {per['fixed']['visual_tokens']:.1f} | {per['routed']['visual_tokens']:.1f} |",
            f"| language-model tokens (prompt passes + generated) | {per['fixed']['lm_tokens']:.1f} | "
            f"{per['routed']['lm_tokens']:.1f} (routing pass {per['routed']['routing_pass_lm_tokens']:.1f}) |",
            f"| wall time (ms) | {per['fixed_ms']:.1f} | {per['routed_ms']:.1f} (routing pass {per['routing_pass_ms']:.1f}) |",
            "",
            f"Routed / fixed wall time: {c['time_ratio']:.2f}.",
        ]
    lines += ["", f"Router: {result['router_dir']} ({result['fit']})", ""]
    return "\n".join(lines)


def figure(cmp: dict) -> Figure:
    """Accuracy (%) against mean visual tokens (log x): fixed scales, the cascade, the router, the oracle."""
    fig = Figure(figsize=figures.SIZE_INCHES, dpi=figures.DPI, layout="constrained")
    ax = fig.add_subplot()
    xy = lambda points: ([p["tokens"] for p in points], [100 * p["accuracy"] for p in points])  # noqa: E731
    ax.plot(*xy(cmp["fixed"]), "-o", color="black", label="fixed scale")
    if "cascade" in cmp:
        ax.plot(*xy(sorted(cmp["cascade"], key=lambda p: p["tokens"])), "-^", color="C1", label="cascade (thresholds)")
    ax.plot(*xy(cmp["router_sweep"]), "-s", color="C0", markersize=4, label="router (budgets)")
    r, o = cmp["router"], cmp["oracle"]
    ax.plot(
        [r["tokens"]], [100 * r["accuracy"]], "D", color="C0", markersize=9, label=f"router, budget {r['budget']:g}"
    )
    ax.plot([o["tokens"]], [100 * o["accuracy"]], figures.ORACLE_MARKER, color="C3", markersize=16, label="oracle")
    scales = cmp["scales"]
    right = max(scales[-1], *[p["tokens"] for p in cmp.get("cascade", [])])
    figures.token_axis(ax, scales, right, "mean visual tokens per image, every pass counted (log scale)")
    ax.set_title(f"Held-out accuracy against visual tokens ({cmp['num_samples']} samples)")
    fig.legend(loc="outside right upper")
    return fig


def write(result: dict, out_dir: str | Path, title: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"report.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result, title))
    figures.save(figure(result["comparison"]), paths["png"])
    return paths
