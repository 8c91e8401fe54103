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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

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

# ClientError codes raised on this side that are the user's input, not the service's fault.
INPUT_CODES = {"no_api_url", "invalid_job_id", "no_artifacts"}


# --- library half ---------------------------------------------------------------------------

class ProgressBars:
    """One tqdm bar per stage, over layers."""

    def __init__(self):
        self.bars = {}

    def __call__(self, stage, done, total):
        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:<11}", unit="step",
                                          file=sys.stderr, leave=True)
        bar.update(done - bar.n)

    def close(self):
        for bar in self.bars.values():
            bar.close()


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned lines: the first column left-aligned, the others right."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def summary_table(report) -> str:
    rows = [("ffn site", "kind", "heads/unit", "omega", "local rel")]
    plans = {p["path"]: p for p in report.config["attention_only"]["sites"]}
    for entry in report.local or [{"site": p} for p in plans]:
        plan = plans[entry["site"]]
        rows.append((entry["site"], plan["kind"], str(plan["heads_per_unit"]), f"{plan['omega']:.4g}", fmt(entry.get("ffn_rel"))))
    lines = table(rows)
    s = report.summary
    lines.append("")
    for key in ("logits_max_abs", "logits_max_rel", "kl_max", "top1_agreement", "hidden_min_cosine", "greedy_identical",
                "greedy_ties", "attention_heads_added", "storage_dtype"):
        if s.get(key) is not None:
            lines.append(f"{key:<22} {fmt(s[key])}")
    lines.append(f"{'verdict':<22} {'PASSED' if report.passed else 'FAILED'}")
    lines += [f"  - {failure}" for failure in report.failures]
    return "\n".join(lines)


def inspect_table(report: dict) -> str:
    """report.json as a table: one row per FFN site, then the summary and the verdict."""
    sites = (report.get("construction") or {}).get("sites") or []
    checks = {e.get("site"): e for e in (report.get("checks") or {}).get("local") or []}
    rows = [("ffn site", "kind", "activation", "heads/unit", "omega", "calib rel", "check rel", "adjusted")]
    for site in sites:
        check = checks.get(site.get("path"), {})
        adjusted = site.get("adjusted")
        rows.append((
            str(site.get("path", "?")), str(site.get("kind", "-")), str(site.get("activation") or "-"),
            fmt(site.get("heads_per_unit")),
            f"{site['omega']:.4g}" if isinstance(site.get("omega"), (int, float)) else "-",
            fmt(site.get("calibration_rel", check.get("calibration_rel"))), fmt(check.get("ffn_rel")),
            "yes" if adjusted else "-",
        ))
    source = report.get("source") or {}
    calibration = report.get("calibration") or {}
    lines = [f"source       {source.get('architecture', '?')} ({source.get('model_type', '?')})",
             f"calibration  {calibration.get('kind', '?')}, {fmt(calibration.get('tokens'))} tokens"
             f" in {fmt(calibration.get('sequences'))} sequences", ""]
    lines += table(rows) if sites else ["(no FFN sites)"]
    summary = report.get("summary") or {}
    lines.append("")
    for key in ("tolerance", "max_local_rel", "logits_max_abs", "logits_max_rel", "kl_max", "top1_agreement",
                "hidden_min_cosine", "greedy_identical", "greedy_ties", "attention_heads_added", "dtype", "storage_dtype"):
        if summary.get(key) is not None:
            lines.append(f"{key:<22} {fmt(summary[key])}")
    verdict = report.get("verdict") or {}
    lines.append(f"{'verdict':<22} {'PASSED' if verdict.get('passed') else 'FAILED'}")
    lines += [f"  - {failure}" for failure in verdict.get("failures") or []]
    return "\n".join(lines)


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


def error(code: str, message: str) -> None:
    print(f"error [{code}]: {message}", file=sys.stderr)


def run_library(args) -> int:
    from .errors import ConversionError

    bars = ProgressBars()
    try:
        if args.command == "convert":
            from .convert import convert
            from .options import ConversionOptions

            options = ConversionOptions(tolerance=args.tolerance, dtype=args.dtype, calibration=args.calibration,
                                        calibration_tokens=args.calibration_tokens,
                                        seq_len=args.seq_len, greedy_tokens=args.greedy_tokens, allow_pickle=args.allow_pickle,
                                        construction=args.construction, explicit_max_params=args.explicit_max_params,
                                        device=args.device)
            report = convert(args.source, args.out, options, progress=bars)
            bars.close()
            print(summary_table(report))
            if args.explain:
                from .explain_cli import add_to_report

                add_to_report(args.out, args.explain)
            print(f"\nwrote {args.out}/ (config.json, weights, report.json)")
            return EXIT_OK if report.passed else EXIT_FAILED
        if args.command == "check":
            from .convert import check

            report = check(args.out, args.source, progress=bars)
            bars.close()
            print(summary_table(report))
            return EXIT_OK if report.passed else EXIT_FAILED
        if args.command == "inspect":
            return inspect(args.out)
        if args.command == "explain":
            from .explain_cli import run_explain

            return run_explain(args)
        if args.command == "architectures":
            from .patterns import TABLE_FILE, describe_patterns

            print("FFN patterns (a model converts when each of its FFNs matches one):")
            for row in describe_patterns():
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
            seen = json.loads(TABLE_FILE.read_text())["model_types"]
            if seen:
                print(f"\nmodel types seen to convert (transformers {seen['transformers']}, {seen['measured']}):")
                print("  " + ", ".join(seen["converted"]))
            return EXIT_OK
        return generate(args)
    except ConversionError as exc:
        bars.close()
        error(exc.code, exc.message)
        return EXIT_USAGE


def inspect(out: str) -> int:
    path = Path(out)
    path = path if path.is_file() else path / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        error("source_missing_file", f"{path} does not exist (inspect reads a converted directory's report.json)")
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        error("invalid_report", f"{path} is not a readable report.json: {exc}")
        return EXIT_USAGE
    if not isinstance(report, dict):
        error("invalid_report", f"{path} is not a report.json")
        return EXIT_USAGE
    print(inspect_table(report))
    return EXIT_OK if (report.get("verdict") or {}).get("passed") else EXIT_FAILED


def generate(args) -> int:
    import torch

    from .runtime import load_converted

    model = load_converted(args.out, device="cpu")
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        error("not_a_decoder", "generate needs a model with a language-model head")
        return EXIT_USAGE
    if not args.prompt_ids:
        error("invalid_options", "--prompt-ids needs at least one id")
        return EXIT_USAGE
    vocab = model.get_output_embeddings().weight.shape[0]
    if any(not 0 <= t < vocab for t in args.prompt_ids):
        error("invalid_options", f"prompt ids must be in [0, {vocab})")
        return EXIT_USAGE
    prompt = torch.tensor([args.prompt_ids])
    try:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=0)
    except ValueError as exc:
        error("invalid_options", str(exc))
        return EXIT_USAGE
    print(",".join(str(t) for t in out[0].tolist()))
    return EXIT_OK


# --- service half -----------------------------------------------------------------------------

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


def exit_code_for(exc) -> int:
    """The exit status for a ClientError (see the epilog)."""
    if exc.code in INPUT_CODES:
        return EXIT_USAGE
    if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429) \
            and not exc.code.startswith(("download_", "artifact_")):
        return EXIT_USAGE
    return EXIT_SERVICE


def exit_code_for_job(job) -> int:
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job.state, EXIT_FAILED)


class JobBar:
    """A tqdm bar over a job's percent, its description the state and stage."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.bar = tqdm(total=100.0, unit="%", file=sys.stderr, leave=True, desc=f"{job_id[:8]} waiting",
                        bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}]{postfix}")

    def __call__(self, job) -> None:
        p = job.progress
        stage = p.stage if p.stage and p.stage != job.state and not job.finished else ""
        self.bar.set_description_str(f"{job.id[:8]} {job.state}{' ' + stage if stage else ''}", refresh=False)
        layers = f"layer {p.layers_done}/{p.layers_total}" \
            if p.layers_total and p.layers_done is not None and not job.finished else ""
        self.bar.set_postfix_str(layers + (" cancel requested" if job.cancel_requested and not job.finished else ""),
                                 refresh=False)
        percent = 100.0 if job.state == "succeeded" else max(0.0, min(100.0, p.percent))
        self.bar.n = percent
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def report_outcome(job) -> int:
    """One line on stderr for a finished job; its exit status."""
    if job.state == "succeeded":
        passed = (job.summary or {}).get("passed")
        print(f"job {job.id} succeeded" + (" (checks passed)" if passed else ""), file=sys.stderr)
    elif job.state == "cancelled":
        print(f"job {job.id} cancelled", file=sys.stderr)
    else:
        err = job.error
        error(err.code if err else "failed", f"job {job.id} {job.state}: {err.message if err else 'no reason given'}")
    return exit_code_for_job(job)


def wait_with_bar(api, job_id: str):
    bar = JobBar(job_id)
    try:
        return api.wait(job_id, on_progress=bar)
    finally:
        bar.close()


def download_into(api, job, directory: str) -> None:
    for path in api.download(job.id, directory, job=job):
        print(path)


def print_job(job) -> None:
    p = job.progress
    rows = [
        ("id", job.id), ("state", job.state + (" (cancel requested)" if job.cancel_requested and not job.finished else "")),
        ("source", job.source_url or "-"),
        ("progress", "-" if job.finished else f"{p.percent:.1f}%" + (f" {p.stage}" if p.stage else "")
         + (f", layer {p.layers_done}/{p.layers_total}" if p.layers_total and p.layers_done is not None else "")),
        ("created", job.created_at.isoformat() if job.created_at else "-"),
        ("finished", job.finished_at.isoformat() if job.finished_at else "-"),
        ("attempts", str(job.attempts)),
    ]
    if job.reused_from:
        rows.append(("reused from", job.reused_from))
    if job.error:
        rows.append(("error", f"[{job.error.code}] {job.error.message}"))
    for key in ("passed", "ffn_sites", "attention_heads_added", "max_local_rel", "logits_max_rel", "kl_max"):
        if job.summary and job.summary.get(key) is not None:
            rows.append((key, fmt(job.summary[key])))
    for artifact in job.artifacts:
        rows.append(("artifact", f"{artifact.name} ({artifact.size} bytes)"
                     + (f" sha256 {artifact.sha256}" if artifact.sha256 else "")))
    for key, value in rows:
        print(f"{key:<22} {value}")


def job_json(job) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(job), default=str))


def run_service(args) -> int:
    from .client import Client, ClientError

    url = args.api_url or os.environ.get("ATTNONLY_API_URL")
    key = args.api_key or os.environ.get("ATTNONLY_API_KEY")
    if not url:
        error("no_api_url", "no service URL: pass --api-url or set ATTNONLY_API_URL")
        return EXIT_USAGE
    job_id = None
    try:
        with Client(url, key) as api:
            if args.command == "submit":
                try:
                    options = options_from(args.option or [])
                except ValueError as exc:
                    error("invalid_options", str(exc))
                    return EXIT_USAGE
                job = api.submit(args.source_url, options or None, args.idempotency_key)
                job_id = job.id
                print(job.id, flush=True)
                if job.replayed:
                    print(f"job {job.id}: an earlier submission with this idempotency key", file=sys.stderr)
                if not (args.wait or args.download):
                    return EXIT_OK
                job = wait_with_bar(api, job.id)
                code = report_outcome(job)
                if args.download and job.artifacts:
                    download_into(api, job, args.download)
                return code
            if args.command == "watch":
                job_id = args.id
                return report_outcome(wait_with_bar(api, args.id))
            if args.command == "status":
                job = api.status(args.id)
                if args.json:
                    print(json.dumps(job_json(job), indent=2))
                else:
                    print_job(job)
                return EXIT_OK
            if args.command == "list":
                jobs = api.list(state=args.state, limit=args.limit)
                if args.json:
                    print(json.dumps([job_json(j) for j in jobs], indent=2))
                elif jobs:
                    rows = [("id", "state", "progress", "created", "source")]
                    rows += [(j.id, j.state, f"{j.progress.percent:.0f}%",
                              j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-", j.source_url or "-")
                             for j in jobs]
                    print("\n".join(table(rows)))
                return EXIT_OK
            if args.command == "cancel":
                job = api.cancel(args.id)
                print(f"job {job.id} {job.state}" + (" (cancel requested; it stops within a layer)"
                                                     if job.cancel_requested and not job.finished else ""))
                return EXIT_OK
            if args.command == "download":
                job = api.status(args.id)
                if not job.artifacts:
                    error("no_artifacts", f"job {job.id} has no artifacts (it is {job.state})")
                    return EXIT_USAGE if job.state != "failed" else EXIT_FAILED
                download_into(api, job, args.dir)
                return EXIT_OK if job.state == "succeeded" else report_outcome(job)
    except ClientError as exc:
        error(exc.code, exc.message)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        if job_id:
            print(f"\ninterrupted; job {job_id} goes on (attnonly watch {job_id})", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


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
    if args.command in LIBRARY_COMMANDS:
        return run_library(args)
    return run_service(args)


if __name__ == "__main__":
    sys.exit(main())
