"""The anchors' trade-off: HS change against FA change over each form's strength, from safety benchmark results.

Issue 13, item 3. Reads one or more JSON files of ``benchmarks/safety_bench.py`` (a plain ``safety.json``, or the
``{"sweep": NAME, "values": {...}}`` object of ``--sweep NAME=v1,v2,...``) and draws every non-reference row as a
point at (FA change vs SFT, HS change vs SFT) with both 95% intervals, the points of one method joined in the order
given, each labelled with its strength (``NAME=value`` of a sweep, or the label given with the file). The target
region of issue 13 (HS cut >= 70% of SFT's HS, the FA change interval's lower end >= -1 point) is shaded. A Markdown
table lists the same points and says which meet the target::

    python benchmarks/anchor_tradeoff.py \
        --input benchmarks/results/safety.json --input benchmarks/results/safety_sweep_inside.json \
        --methods asft_safelora,asft_rotated,asft_inside \
        --out_md benchmarks/results/anchor_tradeoff.md --out_png benchmarks/results/anchor_tradeoff.png

``--input LABEL=PATH`` labels the rows of a plain file (e.g. ``--input lam_inside=100=results.json`` is read as the
label ``lam_inside=100`` and the path ``results.json``: the label is everything before the last ``=``). Outputs
are written atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REFERENCES = ("aligned", "sft")
HS_CUT = 0.70
"""Issue 13's target: the HS cut against SFT, as a fraction of SFT's HS."""
FA_FLOOR = -1.0
"""Issue 13's target: lowest admissible lower end of the FA change's 95% interval (points)."""
FIGURES = ("hs", "d_hs", "d_hs_ci", "d_fa", "d_fa_ci", "benign_refusal")
"""A point's measured figures: equal figures mean the same run (collapsed across a sweep, or read from two files)."""


def _summaries(obj: Mapping[str, Any], label: str, source: str) -> list[tuple[str, Mapping[str, Any]]]:
    """``(label, summary)`` per table in one benchmark JSON: one per sweep value, or the file itself."""
    if "sweep" in obj:
        return [(f"{obj['sweep']}={value}", summary) for value, summary in obj["values"].items()]
    if "rows" not in obj:
        raise ValueError(f"{source}: neither a safety.json object (no 'rows') nor a --sweep one (no 'sweep')")
    return [(label, obj)]


def collect(inputs: Sequence[tuple[str, Mapping[str, Any], str]], methods: Sequence[str] | None = None
            ) -> dict[str, Any]:
    """The trade-off points of every non-reference row.

    Args:
        inputs: ``(label, benchmark JSON object, source name)`` per input file.
        methods: Rows to keep (``None``: every row but aligned and SFT), in the legend's order.

    Returns:
        ``{"sft": {hs, seeds}, "points": [{method, strength, seeds, hs, d_hs, d_hs_ci, d_fa, d_fa_ci,
        benign_refusal, hs_cut, meets_target, source}], "controls": [...]}``; ``hs_cut`` is ``-d_hs / SFT's HS`` of
        the same table. A row met again with the same strength and figures (the same cached run in two files) is
        one point. ``controls``: the tables' paired control-minus-method comparisons (``safety_bench``'s
        ``controls``) of the kept methods, each with its ``strength`` and ``outside_noise`` (the control's HS is
        higher, the interval's lower end above 0).

    Raises:
        ValueError: a file without an SFT row, or seeds differing between the tables.
    """
    points: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    sft: dict[str, Any] | None = None
    for label, obj, source in inputs:
        for strength, summary in _summaries(obj, label, source):
            rows = {r["method"]: r for r in summary["rows"]}
            if "sft" not in rows:
                raise ValueError(f"{source} ({strength or 'no label'}): no 'sft' row; the changes are paired with SFT")
            seeds = list(summary.get("seeds", []))
            if sft is None:
                sft = {"hs": rows["sft"]["hs"], "seeds": seeds}
            elif seeds != sft["seeds"]:
                raise ValueError(f"{source} ({strength or 'no label'}): seeds {seeds} differ from the first table's "
                                 f"{sft['seeds']}; compare tables over the same seeds")
            for method, r in rows.items():
                if method in REFERENCES or (methods is not None and method not in methods):
                    continue
                cut = -r["d_hs_vs_sft"] / rows["sft"]["hs"] if rows["sft"]["hs"] else 0.0
                meets = cut >= HS_CUT and r["d_fa_ci"] is not None and r["d_fa_ci"][0] >= FA_FLOOR
                points.append({
                    "method": method, "strength": strength, "seeds": seeds, "hs": r["hs"],
                    "d_hs": r["d_hs_vs_sft"], "d_hs_ci": r["d_hs_ci"], "d_fa": r["d_fa_vs_sft"],
                    "d_fa_ci": r["d_fa_ci"], "benign_refusal": r["benign_refusal"], "hs_cut": round(cut, 4),
                    "meets_target": bool(meets), "source": source,
                })
            for c in summary.get("controls", []):
                if methods is None or c["control"] in methods:
                    controls.append({**c, "strength": strength, "outside_noise": c["d_hs_ci"][0] > 0,
                                     "source": source})
    if sft is None:
        raise ValueError("no input tables")
    points = _dedupe(_collapse_unswept(points))
    controls = _dedupe(controls, ("control", "method", "strength", "d_hs", "d_hs_ci", "d_fa", "d_fa_ci"))
    order = list(methods) if methods is not None else list(dict.fromkeys(p["method"] for p in points))
    points.sort(key=lambda p: order.index(p["method"]) if p["method"] in order else len(order))
    return {"sft": sft, "points": points, "controls": controls}


def _dedupe(items: list[dict[str, Any]], keys: Sequence[str] = ("method", "strength", *FIGURES)
            ) -> list[dict[str, Any]]:
    """The first of items equal on ``keys`` (one cached run read from two files)."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps([item[k] for k in keys])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _collapse_unswept(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A method whose row is the same at every value of a sweep (its strength is another setting, e.g. the rotated
    control in a sweep of ``lam_inside``) is one point without a strength, not one per value."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["source"], p["method"]), []).append(p)
    out = []
    for p in points:
        group = groups[(p["source"], p["method"])]
        if len(group) > 1 and all([q[k] for k in FIGURES] == [group[0][k] for k in FIGURES] for q in group):
            if p is group[0]:
                out.append({**p, "strength": ""})
        else:
            out.append(p)
    return out


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def render_markdown(report: Mapping[str, Any], command: str = "") -> str:
    """The points as a table with the target's verdict per row."""
    sft = report["sft"]
    lines = [
        "# Anchors: HS against FA over strength (issue 13)", "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        *([f"- command: `{command}`"] if command else []),
        f"- seeds: {', '.join(map(str, sft['seeds']))}; SFT's HS: {sft['hs']:.1f}",
        f"- target: HS cut >= {HS_CUT:.0%} of SFT's HS (HS change <= {-HS_CUT * sft['hs']:.1f}) and the FA change "
        f"interval's lower end >= {FA_FLOOR:g}", "",
        "| method | strength | HS | HS change vs SFT | HS cut | FA change vs SFT | benign refusal | meets target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(f"| {p['method']} | {p['strength'] or '-'} | {p['hs']:.1f} | {p['d_hs']:+.1f}{_ci(p['d_hs_ci'])} "
                     f"| {p['hs_cut']:.0%} | {p['d_fa']:+.1f}{_ci(p['d_fa_ci'])} | {p['benign_refusal']:.1f} "
                     f"| {'yes' if p['meets_target'] else 'no'} |")
    met = [p for p in report["points"] if p["meets_target"]]
    lines += ["", f"{len(met)} of {len(report['points'])} points meet the target." if met
              else "No point meets the target.", ""]
    if report.get("controls"):
        lines += ["Random-direction controls at the same strength, paired with the method they control (control "
                  "minus method, same seeds and prompts): the direction matters when the control's HS is higher "
                  "with the interval's lower end above 0.", "",
                  "| control | method | strength | HS change | FA change | outside the noise |", "|---|---|---|---|---|---|"]
        for c in report["controls"]:
            lines.append(f"| {c['control']} | {c['method']} | {c['strength'] or '-'} | {c['d_hs']:+.1f}{_ci(c['d_hs_ci'])} "
                         f"| {c['d_fa']:+.1f}{_ci(c['d_fa_ci'])} | {'yes' if c['outside_noise'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path) -> None:
    """FA change (x) against HS change (y) with 95% intervals, one line per method through its strengths, the
    target region shaded; written atomically as PNG (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from asft_lightning.fileio import atomic_write_file

    fig = Figure(figsize=(7.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(p["method"] for p in report["points"]))
    for j, method in enumerate(methods):
        pts = [p for p in report["points"] if p["method"] == method]
        xerr = [[p["d_fa"] - p["d_fa_ci"][0] if p["d_fa_ci"] else 0.0 for p in pts],
                [p["d_fa_ci"][1] - p["d_fa"] if p["d_fa_ci"] else 0.0 for p in pts]]
        yerr = [[p["d_hs"] - p["d_hs_ci"][0] if p["d_hs_ci"] else 0.0 for p in pts],
                [p["d_hs_ci"][1] - p["d_hs"] if p["d_hs_ci"] else 0.0 for p in pts]]
        ax.errorbar([p["d_fa"] for p in pts], [p["d_hs"] for p in pts], xerr=xerr, yerr=yerr, marker="o",
                    capsize=3, color=f"C{j}", label=method)
        for p in pts:
            if p["strength"]:
                ax.annotate(p["strength"], (p["d_fa"], p["d_hs"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=7, color=f"C{j}")
    hs_target = -HS_CUT * report["sft"]["hs"]
    bottom = min([hs_target] + [p["d_hs_ci"][0] if p["d_hs_ci"] else p["d_hs"] for p in report["points"]]) - 3
    right = max([FA_FLOOR] + [p["d_fa_ci"][1] if p["d_fa_ci"] else p["d_fa"] for p in report["points"]]) + 2
    ax.fill_between([FA_FLOOR, right], bottom, hs_target, color="tab:green", alpha=0.12,
                    label=f"target: HS cut >= {HS_CUT:.0%}, FA change >= {FA_FLOOR:g}")
    ax.axhline(0, color="tab:red", linestyle=":", linewidth=1, label="SFT")
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("FA change vs SFT (points; right = more task accuracy)")
    ax.set_ylabel("HS change vs SFT (points; down = safer)")
    ax.set_title(f"Anchors over strength, seeds {', '.join(map(str, report['sft']['seeds']))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _read(spec: str) -> tuple[str, Mapping[str, Any], str]:
    """``--input [LABEL=]PATH`` read: (label, JSON object, path)."""
    label, _, path = spec.rpartition("=")
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--input {path}: {e}") from None
    return label, obj, path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Read the inputs, write the table and the PNG; returns the report object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True,
                   help="[LABEL=]PATH of a safety_bench JSON (plain or --sweep); repeat for several")
    p.add_argument("--methods", default=None, help="comma-separated rows to draw (default: all but aligned and sft)")
    p.add_argument("--out_md", type=Path, default=None)
    p.add_argument("--out_json", type=Path, default=None)
    p.add_argument("--out_png", type=Path, default=None)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        report = collect([_read(spec) for spec in args.input], methods)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not report["points"]:
        raise SystemExit(f"no rows of {methods} in the inputs")
    command = "python benchmarks/anchor_tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from asft_lightning.fileio import atomic_write_text

    text = render_markdown(report, command)
    if args.out_md is not None:
        atomic_write_text(text, args.out_md)
    else:
        print(text)
    if args.out_json is not None:
        atomic_write_text(json.dumps(report, indent=2) + "\n", args.out_json)
    if args.out_png is not None:
        plot(report, args.out_png)
    return report


if __name__ == "__main__":
    main()
