"""report.html: the equivalence report (report.json) as one self-contained page for people.

    html = render(report.to_dict())

Plain HTML and CSS with the plots inline as SVG (report_plots): the page fetches nothing
and needs no JavaScript. Every section copes with what a report may lack (checks that
were not run, encoders without logits, greedy on models that cannot generate).
"""
from __future__ import annotations

from html import escape

from .calibrate import MARGIN
from .report_plots import (
    HALF_COLOR, MARGIN_COLOR, TOLERANCE_COLOR, construction_plot, figure_html, finite, log_plot, zero_note,
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #59636e; margin: 0 0 16px; }
.badge { display: inline-block; padding: 2px 12px; border-radius: 6px; color: #fff; font-size: 18px;
         vertical-align: 3px; margin-left: 8px; letter-spacing: .04em; }
.pass { background: #1a7f37; } .fail { background: #cf222e; }
tr.badrow td { background: #ffebe9; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
.failures { border: 1px solid #cf222e; background: #ffebe9; border-radius: 6px; padding: 8px 16px 8px 32px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 16px 0; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 18px; } .card span { color: #59636e; font-size: 12px; }
.cols { display: flex; flex-wrap: wrap; gap: 0 32px; } .cols > div { flex: 1 1 420px; min-width: 0; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
thead th { background: #f6f8fa; }
tbody th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.hash { overflow-wrap: anywhere; }
.wide { overflow-x: auto; }
figure { margin: 8px 0 16px; } figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: #59636e; font-size: 12px; margin-top: 2px; }
.note { color: #59636e; font-style: italic; }
ul.adjusted { margin: 4px 0; padding-left: 20px; }
"""


def render(report: dict, sections: tuple[str, ...] = ()) -> str:
    """The page for one report (the dict Report.to_dict() returns, i.e. report.json); `sections`:
    more HTML sections asked for (explain.figure_html), after the construction."""
    source = report.get("source") or {}
    verdict = report.get("verdict") or {}
    passed = bool(verdict.get("passed"))
    architecture = source.get("architecture") or "model"
    title = f"{architecture} → attention-only: {'PASSED' if passed else 'FAILED'}"
    body = [
        f"<h1>{escape(architecture)} → attention-only"
        f"<span class='badge {'pass' if passed else 'fail'}'>{'PASSED' if passed else 'FAILED'}</span></h1>",
        f"<p class='sub'>Equivalence report of the conversion ({escape(str(report.get('format', 'attention-only')))}, "
        f"construction {escape(str((report.get('construction') or {}).get('kind', '?')))}).</p>",
        _failures(verdict),
        _cards(report),
        _source_and_options(report),
        _local(report),
        _propagated(report),
        _greedy(report),
        _construction(report),
        *sections,
        _inputs(report),
        _timings_and_files(report),
    ]
    page = ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(part for part in body if part) + "\n</main>\n</body>\n</html>\n")
    # ASCII only (→, Ω, ✓ as character references): the page reads the same whatever
    # encoding it is written or served with. (The CSS, where references would not be read, is ASCII.)
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


# --- sections ----------------------------------------------------------------------------

def _failures(verdict: dict) -> str:
    failures = verdict.get("failures") or []
    if not failures:
        return ""
    items = "".join(f"<li>{escape(str(f))}</li>" for f in failures)
    return f"<div class='failures'><b>Failures</b><ul>{items}</ul></div>"


def _cards(report: dict) -> str:
    summary = report.get("summary") or {}
    sites = _sites(report)
    timings = report.get("timings") or {}
    cards = [
        (len(sites), "FFN sites converted"),
        (_int(sum(s.get("heads") or 0 for s in sites)), "attention heads added"),
        (_num(_tolerance(report)), "tolerance per FFN"),
        (_num(summary.get("max_local_rel")), "max local error"),
        (_num(summary.get("logits_max_rel")), "max rel. error, output"),
        (_seconds(timings.get("total_s")), "total time"),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><b>{escape(str(value))}</b><span>{escape(label)}</span></div>" for value, label in cards) + "</div>"


def _source_and_options(report: dict) -> str:
    source = report.get("source") or {}
    summary = report.get("summary") or {}
    options = report.get("options") or {}
    size = source.get("weights_bytes")
    rows = [
        ("architecture", escape(str(source.get("architecture", "—")))),
        ("model type", escape(str(source.get("model_type", "—")))),
        ("weights sha256", f"<span class='mono hash'>{escape(str(source.get('weights_sha256', '—')))}</span>"),
        ("weights size", escape(_bytes(size))),
        ("storage dtype", escape(str(summary.get("storage_dtype") or "—")) + " <span class='note'>(kept as it was)</span>"),
        ("compute dtype", escape(str(summary.get("dtype") or options.get("dtype") or "—"))
         + " <span class='note'>(conversion and checks)</span>"),
        ("head dtype", "float32"),
    ]
    option_rows = [(key, f"<span class='mono'>{escape(_value(value))}</span>") for key, value in options.items()]
    return ("<h2>Source and options</h2><div class='cols'>"
            f"<div><h3>Source checkpoint</h3>{_kv_table(rows)}</div>"
            f"<div><h3>Options</h3>{_kv_table(option_rows) if option_rows else _note('No options recorded.')}</div>"
            "</div>")


def _local(report: dict) -> str:
    local = (report.get("checks") or {}).get("local") or []
    tolerance = _tolerance(report)
    head = "<h2>Local errors per FFN site</h2>"
    if not local:
        return head + _note("The local check was not run (not among the options' checks).")
    names = [str(e.get("site", "?")) for e in local]
    series = [("check tokens (ffn_rel)", [e.get("ffn_rel") for e in local], "o", "#0969da"),
              ("calibration tokens (calibration_rel)", [e.get("calibration_rel") for e in local], "s", "#8250df")]
    lines = [(tolerance, f"tolerance {_num(tolerance)}", TOLERANCE_COLOR, "-")] if tolerance else []
    if tolerance:
        lines.append((tolerance / 2, f"½ tolerance {_num(tolerance / 2)}", HALF_COLOR, "--"))
        if MARGIN != 0.5:
            lines.append((MARGIN * tolerance, f"calibration target {MARGIN:g} × tolerance", MARGIN_COLOR, ":"))
    svg = log_plot("local", names, series, lines, ylabel="relative error of the FFN output", xlabel="FFN site")
    rows, bad = [], set()
    for i, e in enumerate(local):
        rel = e.get("ffn_rel")
        ok = finite(rel) and tolerance is not None and rel <= tolerance
        if not ok:
            bad.add(i)
        rows.append([f"<code>{escape(str(e.get('site', '?')))}</code>", _cell(e.get("layer")), escape(str(e.get("kind", ""))),
                     _cell(rel, _num), _cell(e.get("calibration_rel"), _num),
                     _cell(rel / tolerance if finite(rel) and tolerance else None, lambda v: f"{v:.3f}"),
                     _mark(ok)])
    table = _table(["site", "layer", "kind", "check error", "calibration error", "÷ tolerance", "≤ tolerance"], rows, bad)
    caption = ("Each FFN's converted heads against the source FFN, on the inputs the site really sees (float64), "
               "on a log axis. The verdict wants every check error at or under the tolerance; a red ring marks an "
               "error over it.")
    return head + figure_html(svg, caption + zero_note(series)) + f"<div class='wide'>{table}</div>"


def _propagated(report: dict) -> str:
    propagated = (report.get("checks") or {}).get("propagated") or {}
    head = "<h2>Propagated errors</h2>"
    if not propagated:
        return head + _note("The propagated check was not run (not among the options' checks).")
    parts = [head]
    residual = propagated.get("residual") or []
    if residual:
        names = [str(r.get("index", i)) for i, r in enumerate(residual)]
        series = [("residual stream (residual_rel)", [r.get("residual_rel") for r in residual], "o", "#0969da")]
        tolerance = _tolerance(report)
        lines = [(tolerance, f"tolerance per FFN {_num(tolerance)}", TOLERANCE_COLOR, "-")] if tolerance else []
        svg = log_plot("residual", names, series, lines, ylabel="relative error of the hidden state",
                        xlabel="hidden state (0: embeddings, then after each layer)", labelled=True)
        parts.append("<h3>Residual stream, layer by layer</h3>" + figure_html(
            svg, "The whole converted model against the source on the check tokens: each hidden state's relative "
            "error, on a log axis; errors grow as they propagate through the layers." + zero_note(series)))
    limits = _limits(report)
    logits, hidden = propagated.get("logits"), propagated.get("hidden")
    if logits:
        rel_limit, kl_limit = limits
        rows = [
            ("max |Δ logit|", _num(logits.get("max_abs")), "", None),
            ("max relative (÷ max |logit|)", _num(logits.get("max_rel")), _le(rel_limit), _under(logits.get("max_rel"), rel_limit)),
            ("RMS Δ logit", _num(logits.get("rms")), "", None),
            ("reference max |logit|", _num(logits.get("reference_max_abs")), "", None),
            ("KL max", _num(logits.get("kl_max")), _le(kl_limit), _under(logits.get("kl_max"), kl_limit)),
            ("KL mean", _num(logits.get("kl_mean")), "", None),
            ("top-1 agreement", _percent(logits.get("top1_agreement")), "", None),
            ("top-1 ties", _int(logits.get("top1_ties")), "", None),
            ("top-1 mismatches (not ties)", _int(logits.get("top1_mismatches")), "= 0",
             logits.get("top1_mismatches") == 0 if logits.get("top1_mismatches") is not None else None),
        ]
        parts.append("<h3>Logits</h3>" + _metric_table(rows))
    elif hidden:
        rel_limit, _ = limits
        rows = [
            ("max |Δ|", _num(hidden.get("max_abs")), "", None),
            ("max relative", _num(hidden.get("max_rel")), _le(rel_limit), _under(hidden.get("max_rel"), rel_limit)),
            ("min cosine similarity", f"{hidden['min_cosine']:.12f}" if finite(hidden.get("min_cosine")) else "—", "", None),
        ]
        parts.append("<h3>Final hidden states</h3>" + _note("The model has no language-model head: "
                                                            "its last hidden states are compared instead of logits.")
                     + _metric_table(rows))
    return "".join(parts)


def _greedy(report: dict) -> str:
    greedy = (report.get("checks") or {}).get("greedy")
    options = report.get("options") or {}
    head = "<h2>Greedy continuation</h2>"
    if not greedy:
        if "greedy" not in (options.get("checks") or []):
            return head + _note("Not run (not among the options' checks).")
        return head + _note("Not run: the model has no language-model head to generate with "
                            "(or greedy_tokens is 0, or the context leaves no room for a prompt).")
    first = greedy.get("first_parting")
    rows = [
        ("tokens generated", escape(_int(greedy.get("tokens")))),
        ("identical continuation", _yes_no(greedy.get("identical"))),
        ("first parting step", "— (never)" if first is None else escape(str(first))),
        ("ties (either token is right)", escape(_list(greedy.get("ties")))),
        ("mismatches (not ties)", escape(_list(greedy.get("mismatches")))),
        ("passed", _mark(greedy.get("passed"))),
        ("time", escape(_seconds(greedy.get("seconds")))),
    ]
    return head + _kv_table(rows) + _note(
        "transformers' generate() on both models from the same prompt; where they part, the converted model's logits "
        "along the reference continuation tell a tie (the top two within the logit error) from a mismatch.")


def _construction(report: dict) -> str:
    sites = _sites(report)
    head = "<h2>Construction per site</h2>"
    if not sites:
        return head + _note("No FFN sites recorded.")
    names = [str(s.get("path", "?")) for s in sites]
    svg = construction_plot(names, [s.get("heads_per_unit") for s in sites], [s.get("omega") for s in sites])
    rows = [[f"<code>{escape(str(s.get('path', '?')))}</code>", escape(str(s.get("kind", ""))),
             escape(str(s.get("activation", ""))), _yes_no(s.get("causal")), _cell(s.get("units"), _int),
             _cell(s.get("heads_per_unit"), _int), _cell(s.get("heads"), _int), _cell(s.get("omega"), lambda v: f"{v:.4g}"),
             _cell(s.get("input_range"), lambda v: f"{v:.4g}"), _cell(s.get("fit_max_abs_error"), _num),
             _cell(s.get("calibration_rel"), _num)] for s in sites]
    table = _table(["site", "kind", "activation", "causal", "units", "heads/unit", "heads", "Ω", "input range",
                    "fit max |err|", "calibration error"], rows)
    adjusted = [(s.get("path", "?"), s.get("adjusted")) for s in sites if s.get("adjusted")]
    if adjusted:
        items = "".join(f"<li><code>{escape(str(path))}</code><ul class='adjusted'>"
                        + "".join(f"<li>{escape(str(a))}</li>" for a in (adj if isinstance(adj, list) else [adj]))
                        + "</ul></li>" for path, adj in adjusted)
        adjusted_html = f"<ul class='adjusted'>{items}</ul>"
    else:
        adjusted_html = _note("Nothing: every site met the calibration target with its first plan.")
    return (head + figure_html(svg, "Heads per FFN unit (M) and the neuron heads' self bias Ω, per site.")
            + f"<div class='wide'>{table}</div><h3>What the converter adjusted</h3>" + adjusted_html)


def _inputs(report: dict) -> str:
    calibration = report.get("calibration") or {}
    check_inputs = (report.get("checks") or {}).get("inputs") or {}
    rows = [(key, escape(_value(value))) for key, value in calibration.items() if key != "corpus"]
    for key, value in (calibration.get("corpus") or {}).items():
        shown = f"<span class='mono hash'>{escape(_value(value))}</span>" if key == "sha256" else escape(_value(value))
        rows.append((f"corpus {key}", shown))
    check_rows = [(key, escape(_value(value))) for key, value in check_inputs.items()]
    return ("<h2>Inputs</h2><div class='cols'>"
            f"<div><h3>Calibration</h3>{_kv_table(rows) if rows else _note('Not recorded.')}</div>"
            f"<div><h3>Checks</h3>{_kv_table(check_rows) if check_rows else _note('No checks were run.')}</div></div>")


def _timings_and_files(report: dict) -> str:
    timings = report.get("timings") or {}
    files = report.get("files") or {}
    total = timings.get("total_s")
    timing_rows = [[escape(key.removesuffix("_s")), f"<td class='num'>{escape(_seconds(value))}</td>",
                    f"<td class='num'>{f'{100 * value / total:.1f} %' if finite(value) and total else ''}</td>"]
                   for key, value in timings.items()]
    file_rows = [[f"<code>{escape(name)}</code>", f"<td class='num'>{escape(_bytes(size)) if size is not None else '—'}</td>"]
                 for name, size in files.items()]
    return ("<h2>Timings and files</h2><div class='cols'>"
            f"<div><h3>Timings</h3>{_table(['stage', 'time', 'share'], timing_rows) if timing_rows else _note('Not recorded.')}</div>"
            f"<div><h3>Files written</h3>{_table(['file', 'size'], file_rows) if file_rows else _note('Not recorded.')}</div></div>")


# --- values and tables -------------------------------------------------------------------

def _sites(report: dict) -> list:
    return (report.get("construction") or {}).get("sites") or []


def _tolerance(report: dict):
    summary, options = report.get("summary") or {}, report.get("options") or {}
    value = summary.get("tolerance", options.get("tolerance"))
    return value if finite(value) and value > 0 else None


def _limits(report: dict) -> tuple:
    """(relative limit of logits / hidden states, KL limit) the verdict used, or None each."""
    from .convert import KL_LIMIT, LOGITS_REL_FACTOR  # here: convert.py imports this module

    tolerance = _tolerance(report)
    dtype = (report.get("options") or {}).get("dtype") or (report.get("summary") or {}).get("dtype")
    return (LOGITS_REL_FACTOR * tolerance if tolerance else None), KL_LIMIT.get(dtype)


def _num(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "0" if value == 0 else f"{value:.3g}"
    return str(value)


def _int(value) -> str:
    return "—" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _percent(value) -> str:
    return "—" if not finite(value) else f"{100 * value:.4g} %"


def _seconds(value) -> str:
    if not finite(value):
        return "—"
    return f"{value:.3g} s" if value < 60 else f"{int(value // 60)} min {value % 60:.0f} s"


def _bytes(size) -> str:
    if not isinstance(size, int):
        return "—"
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size:,} B" if unit == "B" else f"{value:.3g} {unit} ({size:,} bytes)"


def _value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        return ", ".join(_value(v) for v in value) if len(value) <= 20 else f"{len(value)} items"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _list(values) -> str:
    return "none" if not values else ", ".join(str(v) for v in values)


def _le(limit) -> str:
    return f"≤ {_num(limit)}" if limit is not None else ""


def _under(value, limit):
    return None if limit is None or value is None else (finite(value) and value <= limit)


def _mark(ok) -> str:
    if ok is None:
        return ""
    return "<span class='ok'>✓ yes</span>" if ok else "<span class='bad'>✗ no</span>"


def _yes_no(value) -> str:
    return "—" if value is None else "yes" if value else "no"


def _note(text: str) -> str:
    return f"<p class='note'>{escape(text)}</p>"


def _cell(value, fmt=str) -> str:
    """A right-aligned numeric <td>."""
    return f"<td class='num'>{escape(fmt(value)) if value is not None else '—'}</td>"


def _table(header: list, rows: list, bad=frozenset()) -> str:
    """rows: lists of HTML cells (a cell that is not already a <td> is wrapped in one); the rows
    whose index is in bad are highlighted."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(("<tr class='badrow'>" if i in bad else "<tr>")
                   + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: list) -> str:
    """rows: (label, HTML value)."""
    return "<table><tbody>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>"


def _metric_table(rows: list) -> str:
    """rows: (metric, value, limit, ok or None)."""
    body = "".join(f"<tr><th>{escape(m)}</th><td class='num'>{escape(v)}</td><td>{escape(limit)}</td><td>{_mark(ok)}</td></tr>"
                   for m, v, limit, ok in rows)
    return f"<table><thead><tr><th>metric</th><th>value</th><th>limit</th><th>met</th></tr></thead><tbody>{body}</tbody></table>"
