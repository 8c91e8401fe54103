"""Regenerate shared/conversion/gelu_fits.json: every GELU fit a conversion may ask for
(both forms, every head count, fit ranges 1..256), so conversions look fits up instead of
fitting. Run after changing activations.fit_gelu:  .venv/bin/python tools/make_gelu_fit_table.py"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.conversion.activations import FIT_HEADS, FIT_TABLE, fit_gelu, fit_key  # noqa: E402

RANGES = [float(2**k) for k in range(9)]  # the power-of-two buckets of _range_bucket, 1..256


def main():
    table = {}
    for name in ("gelu_tanh", "gelu_erf"):
        for fit_range in RANGES:
            for heads in FIT_HEADS:
                m = fit_gelu(name, heads, fit_range)
                table[fit_key(name, heads, fit_range)] = [list(m.a), list(m.c), list(m.g), m.max_abs_error]
            print(f"{name} range {fit_range:g}: done", flush=True)
    FIT_TABLE.write_text(json.dumps(table, separators=(",", ":")))
    print(f"wrote {len(table)} fits to {FIT_TABLE}")


if __name__ == "__main__":
    main()
