"""Command line: python -m shared.conversion {convert,check,generate,architectures} ...

    convert SRC OUT [--tolerance T] [--dtype float32|float64] [--calibration auto|text|random] ...
    check OUT SRC
    generate OUT --prompt-ids 1,2,3 --max-new-tokens 20
    architectures
Exit status: 0 passed, 1 checks failed, 2 error (with its stable code on stderr).
"""
import argparse
import sys

import torch
from tqdm import tqdm

from .convert import check, convert
from .errors import ConversionError
from .options import ConversionOptions
from .runtime import load_converted

from .patterns import describe_patterns


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
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    s = report.summary
    lines.append("")
    for key in ("logits_max_abs", "logits_max_rel", "kl_max", "top1_agreement", "hidden_min_cosine", "greedy_identical",
                "greedy_ties", "attention_heads_added", "storage_dtype"):
        if s.get(key) is not None:
            lines.append(f"{key:<22} {fmt(s[key])}")
    lines.append(f"{'verdict':<22} {'PASSED' if report.passed else 'FAILED'}")
    lines += [f"  - {failure}" for failure in report.failures]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.conversion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help="convert a Hugging Face directory into an attention-only checkpoint")
    p.add_argument("source"), p.add_argument("out")
    p.add_argument("--tolerance", type=float, default=None, help="target relative error per layer (default 1e-5 fp32, 1e-10 fp64)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--calibration", choices=("auto", "text", "random"), default="auto",
                   help="auto: the shipped corpus through the source's tokenizer when it has one, else random tokens")
    p.add_argument("--calibration-tokens", type=int, default=256, help="calibration tokens in all")
    p.add_argument("--seq-len", type=int, default=64, help="calibration and check sequence length")
    p.add_argument("--greedy-tokens", type=int, default=32, help="length of the greedy continuation compared")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (torch.load weights_only=True)")
    p = commands.add_parser("check", help="re-run the equivalence checks of a converted checkpoint")
    p.add_argument("out"), p.add_argument("source")
    p = commands.add_parser("generate", help="greedy continuation with a converted decoder")
    p.add_argument("out")
    p.add_argument("--prompt-ids", type=parse_ids, required=True)
    p.add_argument("--max-new-tokens", type=int, default=20)
    commands.add_parser("architectures", help="print the FFN patterns the converter recognises")
    args = parser.parse_args(argv)

    bars = ProgressBars()
    try:
        if args.command == "convert":
            options = ConversionOptions(tolerance=args.tolerance, dtype=args.dtype, calibration=args.calibration,
                                        calibration_tokens=args.calibration_tokens,
                                        seq_len=args.seq_len, greedy_tokens=args.greedy_tokens, allow_pickle=args.allow_pickle)
            report = convert(args.source, args.out, options, progress=bars)
            bars.close()
            print(summary_table(report))
            print(f"\nwrote {args.out}/ (config.json, weights, report.json)")
            return 0 if report.passed else 1
        if args.command == "check":
            report = check(args.out, args.source, progress=bars)
            bars.close()
            print(summary_table(report))
            return 0 if report.passed else 1
        if args.command == "architectures":
            import json

            from .patterns import TABLE_FILE

            print("FFN patterns (a model converts when each of its FFNs matches one):")
            for row in describe_patterns():
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
            seen = json.loads(TABLE_FILE.read_text())["model_types"]
            if seen:
                print(f"\nmodel types seen to convert (transformers {seen['transformers']}, {seen['measured']}):")
                print("  " + ", ".join(seen["converted"]))
            return 0
        model = load_converted(args.out, device="cpu")
        if not hasattr(model, "generate") or model.get_output_embeddings() is None:
            print("error [not_a_decoder]: generate needs a model with a language-model head", file=sys.stderr)
            return 2
        if not args.prompt_ids:
            print("error [invalid_options]: --prompt-ids needs at least one id", file=sys.stderr)
            return 2
        vocab = model.get_output_embeddings().weight.shape[0]
        if any(not 0 <= t < vocab for t in args.prompt_ids):
            print(f"error [invalid_options]: prompt ids must be in [0, {vocab})", file=sys.stderr)
            return 2
        prompt = torch.tensor([args.prompt_ids])
        try:
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=0)
        except ValueError as exc:
            print(f"error [invalid_options]: {exc}", file=sys.stderr)
            return 2
        print(",".join(str(t) for t in out[0].tolist()))
        return 0
    except ConversionError as exc:
        bars.close()
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
