"""Architecture sweep: every causal-LM model type transformers maps, built tiny and random,
saved, converted, and classified.

    .venv/bin/python bench/architectures.py --out bench/out/architectures.json
    .venv/bin/python bench/architectures.py --types gpt2,llama,mamba --timeout 60

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (one child process each, with a
timeout, so a hang or a crash cannot stop the sweep):

  1. build (bench/tiny_builds.py): `tests/conversion/tiny.py`'s default config shrunk field
     by field (tiny_config), its sub-configs (text_config, vision_config, ...) shrunk the same
     way, plus per-type OVERRIDES; the model is first built on the meta device and refused as
     "not shrunk" when it has more than --max-params parameters (a full-size default config
     would take minutes and gigabytes); then built for real (random weights, norms perturbed,
     tiny.perturb_norms) and saved with save_pretrained.
  2. convert: `convert(src, out, ConversionOptions(calibration_tokens=128, seq_len=32, greedy_tokens=16))`.

Outcome per type:
  passed    converted, verdict passed
  failed    converted, verdict failed (report.failures)
  refused   a ConversionError (its .code and message)
  error     any other exception inside convert() (a converter bug, not a refusal)
  timeout   the child ran past --timeout (the stage it was in is recorded)
  crashed   the child died without a result (signal, out of memory)
  no_build  the tiny model could not be built or saved (config/model errors, missing optional
            dependencies, not shrinkable): not counted in the headline's denominator

Headline: of the types that build, how many convert and pass.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.tiny_builds import build_tiny, first_line  # noqa: E402

CONVERT_OPTIONS = dict(calibration_tokens=128, seq_len=32, greedy_tokens=16)
MAX_PARAMS = 5_000_000  # a tiny config is ~0.1M parameters; above this the shrink did not take


# ----------------------------------------------------------------------------------------------
# child: one model type
# ----------------------------------------------------------------------------------------------

def _where(exc: BaseException) -> dict:
    """The innermost frame in shared/ (where the converter was) and the innermost frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/shared/" in f.filename]
    fmt = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}"  # noqa: E731
    return {"converter": fmt(ours[-1]) if ours else None, "innermost": fmt(frames[-1]) if frames else None}


def source_check(directory: Path) -> str:
    """Whether transformers itself runs the saved source: a forward pass and a 4-token greedy
    generate() (tells a converter bug from a tiny model that transformers cannot run)."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"fails: {type(exc).__name__}: {first_line(exc, 200)}"


def child(model_type: str, result_path: Path, max_params: int) -> None:
    result = {"type": model_type, "stage": "import", "converter_digest": converter_digest()}

    def dump():
        result_path.write_text(json.dumps(result, default=str))

    dump()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from shared.conversion import ConversionError, ConversionOptions, convert

    result["class"] = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    with tempfile.TemporaryDirectory(prefix=f"arch-{model_type}-") as tmp:
        t = time.perf_counter()
        result["stage"] = "build"
        dump()
        try:
            model, params, strategy = build_tiny(model_type, max_params)
            result["params"], result["build_strategy"] = params, strategy
            result["built_class"] = type(model).__name__
            result["stage"] = "save"
            dump()
            model.save_pretrained(Path(tmp) / "src")
            del model
        except BaseException as exc:  # noqa: BLE001 - every build failure is a result
            result.update(status="no_build", exception=type(exc).__name__, message=first_line(exc),
                          strategy_errors=getattr(exc, "errors", None), traceback=traceback.format_exc()[-3000:])
            result["build_s"] = time.perf_counter() - t
            dump()
            return
        result["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result["stage"] = "convert"
        dump()
        try:
            report = convert(Path(tmp) / "src", Path(tmp) / "out", ConversionOptions(**CONVERT_OPTIONS))
        except ConversionError as exc:
            result.update(status="refused", code=exc.code, message=exc.message[:1000])
        except BaseException as exc:  # noqa: BLE001
            result.update(status="error", exception=type(exc).__name__, message=first_line(exc),
                          where=_where(exc), traceback=traceback.format_exc()[-3000:])
            result["source_check"] = source_check(Path(tmp) / "src")
        else:
            summary = report.summary
            result.update(status="passed" if report.passed else "failed", failures=list(report.failures),
                          summary={k: summary.get(k) for k in (
                              "source_architecture", "ffn_sites", "attention_heads_added", "max_local_rel",
                              "logits_max_rel", "kl_max", "top1_agreement", "greedy_identical", "hidden_min_cosine")})
        result["convert_s"] = time.perf_counter() - t
        result["stage"] = "done"
        dump()


# ----------------------------------------------------------------------------------------------
# parent: the sweep
# ----------------------------------------------------------------------------------------------

def run_one(model_type: str, timeout: float, max_params: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="arch-result-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_type, "--result", str(path),
               "--max-params", str(max_params)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started
            output, _ = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - started
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            result = {"type": model_type, "stage": "start"}
    result["wall_s"] = round(wall, 1)
    if timed_out:
        result.update(status="timeout", message=f"no result after {timeout:.0f} s (stage: {result.get('stage')})")
    elif "status" not in result:
        tail = [line for line in (output or "").strip().splitlines() if line.strip()][-3:]
        result.update(status="crashed", returncode=proc.returncode,
                      message=f"exit {proc.returncode} in stage {result.get('stage')}: " + " | ".join(tail)[-400:])
    return result


def built(r: dict) -> bool:
    """Whether the type counts as 'builds': it reached conversion."""
    if r["status"] in ("passed", "failed", "refused", "error"):
        return True
    return r["status"] in ("timeout", "crashed") and r.get("stage") in ("convert", "done")


FAILURE_KINDS = [(" local error ", "local error > tolerance"), ("logits max relative", "logits error"),
                 ("top-1 differs", "top-1 differs"), ("KL ", "KL too large"), ("hidden states", "hidden-state error"),
                 ("greedy", "greedy differs")]


def reason(r: dict) -> str:
    """A short group key for a non-passing result."""
    status, msg = r["status"], r.get("message") or ""
    if status == "failed":
        kinds = sorted({next((label for prefix, label in FAILURE_KINDS if prefix in f), f[:60])
                        for f in r.get("failures", [])})
        return "verdict failed: " + "; ".join(kinds)
    if status == "refused":
        if "looks like an FFN but matches no known pattern" in msg:
            m = re.search(r"\((\w+)\) looks like an FFN.*?\(its children: ([^)]*)\)", msg)
            return f"refused [{r['code']}]: unmatched FFN {m.group(1)} (children: {m.group(2)})" if m else msg
        if "activation" in msg and "is none of" in msg:
            m = re.search(r"activation (\w+) is none of", msg)
            return f"refused [{r['code']}]: activation {m.group(1) if m else '?'} not buildable"
        if NO_FFN in msg:
            return f"refused [{r['code']}]: no FFN matched"
        return f"refused [{r['code']}]: " + re.sub(r"\d+", "N", msg)[:160]
    if status == "no_build":
        exc = r.get("exception", "")
        if re.search(r"requires? the|pip install|No module named|is not installed", msg) or exc in (
                "ImportError", "ModuleNotFoundError"):
            return "no_build: missing optional dependency"
        if "trust_remote_code" in msg:
            return "no_build: remote code only"
        if exc == "BuildTooBig":
            return "no_build: not shrunk (> max params)"
        return f"no_build: {exc}"
    if status == "error":
        src = r.get("source_check") or ""
        where = (r.get("where") or {}).get("converter") or "?"
        if src.startswith("fails"):
            return f"error in convert, transformers fails too: {src[len('fails: '):][:90]}"
        return f"error in convert: {r.get('exception')} at {where}" + ("" if src == "ok" else " (source not checked)")
    return f"{status} (stage {r.get('stage')})"


def table(results: list[dict]) -> str:
    rows = ["| type | class | status | sites | max local rel | logits rel | KL | top-1 | s | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "" if x is None else (f"{x:.2g}" if isinstance(x, float) else str(x))

    for r in results:
        s = r.get("summary") or {}
        note = "" if r["status"] == "passed" else (
            "; ".join(r.get("failures", [])[:2]) if r["status"] == "failed" else (r.get("message") or ""))[:120]
        rows.append(f"| {r['type']} | {r.get('class') or ''} | {r['status']} | {fmt(s.get('ffn_sites'))} | "
                    f"{fmt(s.get('max_local_rel'))} | {fmt(s.get('logits_max_rel'))} | {fmt(s.get('kl_max'))} | "
                    f"{fmt(s.get('top1_agreement'))} | {fmt(r.get('wall_s'))} | {note.replace('|', '/')} |")
    return "\n".join(rows)


NO_FFN = "has no FFN that any known pattern matches"  # convert()'s refusal of a model with nothing to replace


def headline(results: list[dict]) -> dict:
    """The headline rate counts every type that builds. Types refused for having no FFN at all
    (pure SSMs: nothing to replace, and no attention to host heads either) stay in it as not
    converted; they are also counted apart, with the rate the other types reach."""
    n_built = sum(built(r) for r in results)
    n_passed = sum(r["status"] == "passed" for r in results)
    no_ffn = [r["type"] for r in results if r["status"] == "refused" and NO_FFN in (r.get("message") or "")]
    counts = defaultdict(int)
    for r in results:
        counts[r["status"]] += 1
    with_ffn = n_built - len(no_ffn)
    return {"types": len(results), "built": n_built, "passed": n_passed,
            "pass_rate_of_built": round(n_passed / n_built, 4) if n_built else None,
            "no_ffn": no_ffn, "pass_rate_of_built_with_ffn": round(n_passed / with_ffn, 4) if with_ffn else None,
            "by_status": dict(counts)}


def grouped(results: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in results:
        if r["status"] != "passed":
            groups[reason(r)].append(r["type"])
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].startswith("no_build"), -len(kv[1]), kv[0])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model type (default 120)")
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS,
                        help=f"refuse to build a model larger than this (default {MAX_PARAMS:,})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --out and run only the types it lacks (a sweep cut "
                             "short); with --types, run those again and keep every other result")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child, args.result, args.max_params)
        return 0

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        parser.error(f"not causal-LM model types: {unknown}")
    started = datetime.datetime.now().astimezone()
    results = []
    if args.resume:
        if not args.out:
            parser.error("--resume needs --out")
        if args.out.exists():
            previous = json.loads(args.out.read_text())
            rerun = set(types) if args.types else set()  # named types run again
            results = [r for r in previous["results"] if r["type"] not in rerun]
            started = datetime.datetime.fromisoformat(previous["started"])
            print(f"resuming: {len(results)} results kept from {args.out}", flush=True)
            types = sorted(set(types) | {r["type"] for r in results})
    done = {r["type"] for r in results}
    for i, model_type in enumerate(types, 1):
        if model_type in done:
            continue
        r = run_one(model_type, args.timeout, args.max_params)
        results.append(r)
        extra = "" if r["status"] == "passed" else " " + reason(r)[:140]
        print(f"[{i}/{len(types)}] {model_type:28s} {r['status']:8s} {r['wall_s']:6.1f}s{extra}", flush=True)
        if args.out:  # partial results as the sweep goes
            _write(args.out, started, args, types, results)

    order = {t: i for i, t in enumerate(types)}
    results.sort(key=lambda r: order[r["type"]])
    print()
    print(table(results))
    head = headline(results)
    print()
    print(f"{head['types']} causal-LM model types; {head['built']} build; {head['passed']} of those convert and pass "
          f"({100 * (head['pass_rate_of_built'] or 0):.1f} %, target >= 80 %); by status: {head['by_status']}")
    print(f"{len(head['no_ffn'])} of the types that build are refused for having no FFN any row matches "
          f"({', '.join(head['no_ffn']) or '-'}): counted above as not converted; without them "
          f"{100 * (head['pass_rate_of_built_with_ffn'] or 0):.1f} %")
    print()
    for key, members in grouped(results).items():
        print(f"{key} ({len(members)}): {', '.join(members)}")
    if args.out:
        _write(args.out, started, args, types, results, done=True)
        print(f"\nresults: {args.out}")
    return 0


def converter_digest() -> str:
    """sha256 (first 12 hex) of shared/conversion's sources: tells whether the converter changed
    while the sweep ran (each result records the digest its child saw)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted((ROOT / "shared" / "conversion").rglob("*.py")):
        digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _write(path: Path, started, args, types, results, done=False):
    import torch
    import transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"started": started.isoformat(timespec="seconds"), "complete": done and len(results) == len(types),
               "transformers": transformers.__version__, "torch": torch.__version__, "timeout_s": args.timeout,
               "max_params": args.max_params, "options": CONVERT_OPTIONS, "converter_digest_at_end": converter_digest(),
               "converter_digests": sorted({r.get("converter_digest") for r in results if r.get("converter_digest")}),
               "headline": headline(results),
               "groups": grouped(results), "results": results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
