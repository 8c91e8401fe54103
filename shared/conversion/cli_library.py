"""`attnonly` on this machine: convert, check, generate, inspect, explain, architectures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error, fmt, table


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
