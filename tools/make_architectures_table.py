"""Regenerate shared/conversion/architectures.json: the FFN patterns (from patterns.PATTERNS) and
the model types a sweep saw convert and pass, for GET /v1/architectures and `architectures`
(the API reads the table and never imports torch). Run after changing the registry or after
a sweep:  .venv/bin/python tools/make_architectures_table.py [bench/out/architectures.json]"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.conversion.patterns import TABLE_FILE, describe_patterns  # noqa: E402


def main(sweep: Path | None):
    table = {"patterns": describe_patterns(), "model_types": json.loads(TABLE_FILE.read_text())["model_types"]
             if TABLE_FILE.is_file() else {}}
    if sweep is not None:
        found = json.loads(sweep.read_text())
        previous = table["model_types"]
        converted = {r["type"] for r in found["results"] if r.get("status") == "passed"}
        table["model_types"] = {
            "transformers": found["transformers"], "measured": found["started"][:10],
            "complete_sweep": found.get("complete", False),
        }
        if not found.get("complete", False):
            # a sweep cut short: the types it did not reach keep the previous table's word, named apart
            measured = {r["type"] for r in found["results"]}
            carried = sorted(t for t in previous.get("converted", []) if t not in measured)
            converted |= set(carried)
            table["model_types"]["carried_from_previous"] = {"types": carried, "measured": previous.get("measured")}
        table["model_types"]["converted"] = sorted(converted)
    TABLE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {TABLE_FILE}: {len(table['patterns'])} patterns, "
          f"{len(table['model_types'].get('converted', []))} model types seen to convert")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
