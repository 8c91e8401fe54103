"""The `explain` command and `convert --explain`: explain.py's text, figure and report section."""
import json
from pathlib import Path

from .format import REPORT_FILE


def run_explain(args) -> int:
    from .explain import explain, render_text, write_figure

    unit = explain(args.out, args.layer, args.unit, args.prompt_ids)
    print(render_text(unit))
    if args.figure:
        write_figure(unit, args.figure)
        print(f"\nwrote {args.figure}")
    if args.report:
        add_to_report(args.out, [(args.layer, args.unit)], [unit])
    return 0


def add_to_report(out, units: list[tuple[int, int]], explained=None) -> Path:
    """report.html again, from report.json, with a section per unit (the units asked for last)."""
    from .explain import explain, figure_html
    from .report_html import render

    out = Path(out)
    explained = explained or [explain(out, layer, unit) for layer, unit in units]
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    page = out / "report.html"
    page.write_text(render(report, tuple(figure_html(e) for e in explained)), encoding="utf-8")
    print(f"added {', '.join(f'{layer}:{unit}' for layer, unit in units)} to {page}")
    return page
