"""Regenerate shared/conversion/gelu_fits.json: every GELU fit a conversion may ask for (both
forms, every head count of FIT_HEADS, the power-of-two fit ranges 1..256), so conversions look
fits up instead of fitting.

    .venv/bin/python tools/make_gelu_fit_table.py --quick      # the quick fits only (~1 min)
    .venv/bin/python tools/make_gelu_fit_table.py [--names gelu_tanh --heads 6,8 --ranges 4,256]

Without --quick, entries are refined by minimax (tools/gelu_minimax.py; needs scipy; minutes
per entry), starting from the stored entry, and an entry is replaced only when the refined
fit's max error is smaller. The table is written after every entry, so a run can be stopped
and started again. A last pass lets each range use the fit of a wider range when that one is
better on its own range (a fit valid on [-R', R'] is valid on every [-R, R] inside it).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.conversion.activations import FIT_HEADS, FIT_TABLE, Mixture, fit_gelu, fit_key  # noqa: E402

NAMES = ("gelu_tanh", "gelu_erf")
RANGES = [float(2**k) for k in range(9)]  # the power-of-two buckets of _range_bucket, 1..256


def entry(m: Mixture) -> list:
    return [list(m.a), list(m.c), list(m.g), m.max_abs_error]


def mixture(stored: list, fit_range: float) -> Mixture:
    a, c, g, error = stored
    return Mixture(tuple(a), tuple(c), tuple(g), error, fit_range)


def quick_table() -> dict:
    table = {}
    for name in NAMES:
        for fit_range in RANGES:
            for heads in FIT_HEADS:
                table[fit_key(name, heads, fit_range)] = entry(fit_gelu(name, heads, fit_range))
            print(f"{name} range {fit_range:g}: done", flush=True)
    return table


OUT = FIT_TABLE  # --out changes it


def save(table: dict) -> None:
    """Atomically: conversions running beside a refinement read the table at any moment."""
    partial = OUT.with_suffix(".partial")
    partial.write_text(json.dumps(table, separators=(",", ":")))
    os.replace(partial, OUT)


def refine_entries(table: dict, names, heads_list, ranges) -> None:
    from gelu_minimax import refine

    for name in names:
        for fit_range in ranges:
            for heads in heads_list:
                key = fit_key(name, heads, fit_range)
                old = mixture(table[key], fit_range)
                started = time.time()
                new = refine(name, old, fit_range)
                better = new.max_abs_error < old.max_abs_error
                if better:
                    table[key] = entry(new)
                    save(table)
                print(f"{key}: {old.max_abs_error:.3e} -> {new.max_abs_error:.3e}"
                      f" ({'kept' if better else 'no gain'}, {time.time() - started:.0f} s)", flush=True)


def borrow_wider_fits(table: dict) -> None:
    from gelu_minimax import max_error_on

    for key, (a, c, g, _) in table.items():  # every stated error measured the same dense way
        table[key][3] = max_error_on(key.split("/")[0], a, c, g, float(key.split("/")[2]))
    for name in NAMES:
        for heads in FIT_HEADS:
            for i, fit_range in enumerate(RANGES):
                key = fit_key(name, heads, fit_range)
                for wider in RANGES[i + 1:]:
                    a, c, g, _ = table[fit_key(name, heads, wider)]
                    error = max_error_on(name, a, c, g, fit_range)
                    if error < table[key][3]:
                        table[key] = [a, c, g, error]
    save(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="write the quick fits only")
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--heads", default=",".join(str(h) for h in FIT_HEADS if h > 1))
    parser.add_argument("--ranges", default=",".join(f"{r:g}" for r in RANGES))
    parser.add_argument("--out", type=Path, default=FIT_TABLE, help="where to write (default: the shipped table)")
    args = parser.parse_args()
    global OUT
    OUT = args.out
    if args.quick or not FIT_TABLE.is_file():
        save(quick_table())
        if args.quick:
            return
    table = json.loads((OUT if OUT.is_file() else FIT_TABLE).read_text())
    refine_entries(table, args.names.split(","), [int(h) for h in args.heads.split(",")],
                   [float(r) for r in args.ranges.split(",")])
    borrow_wider_fits(table)
    print(f"wrote {len(table)} fits to {OUT}")


if __name__ == "__main__":
    main()
