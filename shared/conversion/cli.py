"""The `attnonly` command (also `python -m shared.conversion`).

Library half, on this machine:
    convert SRC OUT [--tolerance T] [--dtype float32|float64] [--calibration auto|text|random] ...
    check OUT SRC
    generate OUT --prompt-ids 1,2,3 --max-new-tokens 20
    inspect OUT
    explain OUT --layer L --unit K [--figure PATH] [--report]
    architectures
Service half, through the HTTP API (--api-url/--api-key, or ATTNONLY_API_URL/ATTNONLY_API_KEY):
    submit URL [--option key=value ...] [--wait] [--download DIR]
    status ID | list | cancel ID | watch ID | download ID DIR

This module is the parser, the exit statuses and what both halves print with; the halves run
in cli_library (this machine) and cli_service (the HTTP API).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVICE, EXIT_CANCELLED = 0, 1, 2, 3, 4

EPILOG = """\
exit status:
  0  success (a conversion passed its checks, a job succeeded, a request was answered)
  1  a job failed, or a conversion's checks (its verdict) failed; the error code is printed
  2  usage or input error: bad arguments, a missing or unreadable file, a ConversionError,
     or a request the service refused as given (4xx: invalid options, unknown job id,
     missing or unknown API key, a job that already finished)
  3  the service is unreachable, or an HTTP error on its side (5xx, 429 rate limited), or a
     download that failed or did not match the job's size or sha256
  4  the job was cancelled
  130 interrupted (Ctrl-C); a job keeps running on the service

environment:
  ATTNONLY_API_URL  the service, e.g. http://localhost:8000 (or --api-url)
  ATTNONLY_API_KEY  your API key (or --api-key)

examples:
  attnonly convert ./gpt2 ./gpt2-ao --tolerance 1e-5
  attnonly inspect ./gpt2-ao
  ID=$(attnonly submit https://models.example.org/gpt2/ --option calibration.tokens=512)
  attnonly watch "$ID" && attnonly download "$ID" ./gpt2-ao
  attnonly submit https://models.example.org/gpt2/ --wait --download ./gpt2-ao
"""


def error(code: str, message: str) -> None:
    print(f"error [{code}]: {message}", file=sys.stderr)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned lines: the first column left-aligned, the others right."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3e}"
    return str(value)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("token ids must be integers separated by commas") from None


def parse_unit(text: str) -> tuple[int, int]:
    layer, sep, unit = text.partition(":")
    try:
        return int(layer), int(unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a unit is LAYER:UNIT, e.g. 0:5") from None


def parse_option(text: str) -> tuple[list[str], Any]:
    """``key=value`` (``calibration.tokens=512``): a dotted key, and the value as JSON when it
    reads as JSON (numbers, true, lists), else as a string; ``checks=local,greedy`` is a list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise argparse.ArgumentTypeError(f"{text!r}: an option is key=value (e.g. calibration.tokens=512)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = [v for v in raw.split(",") if v] if key.strip() == "checks" else raw
    if key.strip() == "checks" and isinstance(value, str):
        value = [value]
    return key.strip().split("."), value


def options_from(pairs: list[tuple[list[str], Any]]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for path, value in pairs:
        node = options
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"option {'.'.join(path)}: {part} is already set to a value")
            node = child
        node[path[-1]] = value
    return options


# --- the parser -------------------------------------------------------------------------------

LIBRARY_COMMANDS = ("convert", "check", "generate", "inspect", "explain", "architectures")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    service_options = argparse.ArgumentParser(add_help=False)
    group = service_options.add_argument_group("service")
    group.add_argument("--api-url", default=argparse.SUPPRESS, metavar="URL",
                       help="the service, e.g. http://localhost:8000 (default: $ATTNONLY_API_URL)")
    group.add_argument("--api-key", default=argparse.SUPPRESS, metavar="KEY",
                       help="your API key (default: $ATTNONLY_API_KEY)")

    parser = argparse.ArgumentParser(prog=prog, description="Attention-only conversion: the library on this machine, "
                                     "and a client of the conversion service.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=None, metavar="URL",
                        help="service commands: the service (default: $ATTNONLY_API_URL); also after the command")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="service commands: your API key (default: $ATTNONLY_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, service: bool = False) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[service_options] if service else [])

    p = command("convert", "convert a Hugging Face directory into an attention-only checkpoint")
    p.add_argument("source"), p.add_argument("out")
    p.add_argument("--tolerance", type=float, default=None, help="target relative error per layer (default 1e-5 fp32, 1e-10 fp64)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--calibration", choices=("auto", "text", "random"), default="auto",
                   help="auto: the shipped corpus through the source's tokenizer when it has one, else random tokens")
    p.add_argument("--calibration-tokens", type=int, default=256, help="calibration tokens in all")
    p.add_argument("--seq-len", type=int, default=64, help="calibration and check sequence length")
    p.add_argument("--greedy-tokens", type=int, default=32, help="length of the greedy continuation compared")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (torch.load weights_only=True)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the forward passes compute: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--construction", choices=("compact", "explicit"), default="compact",
                   help="explicit: literal Q/K/V/O heads over a widened residual, for small models (docs/DESIGN.md §8)")
    p.add_argument("--explicit-max-params", type=int, default=50_000_000, metavar="N",
                   help="refuse an explicit form with more head parameters than this (default 50M)")
    p.add_argument("--explain", action="append", type=parse_unit, metavar="L:K",
                   help="add unit K of layer L, in both forms, to report.html (repeatable)")
    p = command("check", "re-run the equivalence checks of a converted checkpoint")
    p.add_argument("out"), p.add_argument("source")
    p = command("generate", "greedy continuation with a converted decoder")
    p.add_argument("out")
    p.add_argument("--prompt-ids", type=parse_ids, required=True)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p = command("inspect", "per FFN site of a converted directory: kind, activation, heads, omega, errors (report.json)")
    p.add_argument("out", help="a converted directory, or its report.json")
    p = command("explain", "one FFN unit's head in both forms: compact (a, c, g, Omega) and explicit (Q, K, V, O), "
                "and its attention pattern on an example")
    p.add_argument("out", help="a converted directory")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--unit", type=int, required=True)
    p.add_argument("--prompt-ids", type=parse_ids, default=None, help="the example tokens (default: 8 random ids)")
    p.add_argument("--figure", metavar="PATH", help="also write the figure (.svg or .png)")
    p.add_argument("--report", action="store_true", help="also add the unit to OUT/report.html")
    command("architectures", "print the FFN patterns the converter recognises")

    p = command("submit", "submit a conversion job to the service; prints its id", service=True)
    p.add_argument("source_url", metavar="URL", help="a Hugging Face directory as a base URL, a .tar/.tar.gz of one, "
                   "or s3://bucket/prefix")
    p.add_argument("--option", "-o", action="append", type=parse_option, metavar="KEY=VALUE",
                   help="a job option, repeatable: tolerance=1e-5, dtype=float64, calibration.tokens=512, "
                   "calibration.seq_len=64, checks=local,propagated, greedy_tokens=16, seed=1 "
                   "(values read as JSON when they are)")
    p.add_argument("--idempotency-key", metavar="KEY", help="submitting the same key again returns the first job")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends; exit with its outcome")
    p.add_argument("--download", metavar="DIR", help="then download its artifacts into DIR (implies --wait)")
    p = command("status", "a job's state, progress and artifacts", service=True)
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the job as JSON")
    p = command("list", "your jobs, newest first", service=True)
    p.add_argument("--state", choices=("queued", "downloading", "converting", "checking", "uploading",
                                       "succeeded", "failed", "cancelled"))
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20; 0: all)")
    p.add_argument("--json", action="store_true", help="the jobs as JSON")
    p = command("cancel", "cancel a job: at once if queued, within a layer if running", service=True)
    p.add_argument("id")
    p = command("watch", "live progress of a job until it ends; exits with its outcome", service=True)
    p.add_argument("id")
    p = command("download", "download a job's artifacts into DIR (sizes and sha256 checked, written atomically)",
                service=True)
    p.add_argument("id"), p.add_argument("dir")
    return parser


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m shared.conversion" if name in ("", "__main__.py", "-c") else name


def main(argv=None) -> int:
    parser = build_parser(_prog())
    args = parser.parse_args(argv)
    if args.command == "list" and args.limit is not None:
        if args.limit < 0:
            parser.error("--limit must be 0 or more")
        args.limit = args.limit or None
    # The halves import this module (exit statuses, error): imported here, once it is whole.
    if args.command in LIBRARY_COMMANDS:
        from .cli_library import run_library

        return run_library(args)
    from .cli_service import run_service

    return run_service(args)


if __name__ == "__main__":
    sys.exit(main())
