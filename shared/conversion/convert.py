"""convert(): source directory -> converted directory with config, weights and report.

URL-free and service-free: load -> calibrate -> plan -> write (streamed) -> check -> report.
The output appears atomically: everything is written to a hidden sibling directory that is
renamed into place at the end, and removed on any error or cancellation.
"""
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import checks
from .calibrate import calibrate, calibration_batches
from .construct import plan_layer
from .errors import ConversionCancelled, InvalidOptionsError, SourceMismatchError
from .format import (CONFIG_FILE, read_config, FORMAT_NAME, FORMAT_VERSION, REPORT_FILE, TORCH_DTYPES, WEIGHTS_FILE,
                     StreamingSafetensorsWriter, runtime_name)
from .options import ConversionOptions
from .report import Report
from .runtime import load_converted
from .sources import SourceModel, expected_shapes

# Thresholds of the verdict, relative to the tolerance where they scale with it.
LOGITS_REL_FACTOR = 10.0  # logits max |Δ| <= 10 * tolerance * max |logit|
KL_LIMIT = {"float32": 1e-6, "float64": 1e-12}


def convert(source_dir, out_dir, options: ConversionOptions | None = None, *, progress=None, should_cancel=None) -> Report:
    options = options or ConversionOptions()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidOptionsError(f"output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        report = _convert_into(Path(source_dir), staging, options, progress or (lambda *a: None),
                               should_cancel or (lambda: False))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _convert_into(source_dir: Path, out: Path, options: ConversionOptions, progress, should_cancel) -> Report:
    started = time.perf_counter()
    dtype = TORCH_DTYPES[options.dtype]
    timings = {}

    def cancel_point():
        if should_cancel():
            raise ConversionCancelled("the conversion was cancelled")

    progress("loading", 0, 1)
    source = SourceModel(source_dir, allow_pickle=options.allow_pickle)
    arch = source.arch
    n_layers = arch["n_layers"]
    progress("loading", 1, 1)

    batches = calibration_batches(options, arch["vocab_size"], arch["max_positions"])
    t = time.perf_counter()
    stats = calibrate(source, batches, torch.float64 if options.dtype == "float64" else torch.float32,
                      _cancellable(progress, cancel_point))
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    layers, head_tensors = [], []
    for i, layer_stats in enumerate(stats):
        cancel_point()
        sublayers, tensors = plan_layer(arch, layer_stats, options.tolerance, dtype)
        layers.append({"index": i, "sublayers": sublayers})
        head_tensors.append(tensors)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "construction": options.construction,
        "dtype": options.dtype,
        "tolerance": options.tolerance,
        "source": {
            "architecture": arch["source_architecture"],
            "family": arch["family"],
            "weights_sha256": source.checkpoint.weights_sha256(),
            "weights_bytes": source.checkpoint.total_bytes(),
            "config": source.checkpoint.config,
        },
        "calibration": {"sequences": sum(b.shape[0] for b in batches), "tokens": sum(b.numel() for b in batches),
                        "explicit": options.calibration_token_ids is not None, "seed": options.seed},
        "model": arch,
        "layers": layers,
    }
    _write_weights(out / WEIGHTS_FILE, source, head_tensors, dtype, progress, cancel_point)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    timings["write_s"] = time.perf_counter() - t

    report = Report(config=config, options=options.to_dict())
    if options.checks:
        t = time.perf_counter()
        _run_checks(report, source_dir, out, arch, options, dtype, progress, cancel_point)
        timings["check_s"] = time.perf_counter() - t
    report.finish(options.tolerance, LOGITS_REL_FACTOR, KL_LIMIT[options.dtype])
    report.timings = {**timings, "total_s": time.perf_counter() - started}
    report.files = {p.name: p.stat().st_size for p in out.iterdir()}
    report.files[REPORT_FILE] = None
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def check(out_dir, source_dir, options: ConversionOptions | None = None, progress=None) -> Report:
    """Re-run the equivalence checks of a converted directory against its source."""
    config = read_config(out_dir)
    source = SourceModel(source_dir, allow_pickle=options.allow_pickle if options else False)
    if source.checkpoint.weights_sha256() != config["source"]["weights_sha256"]:
        raise SourceMismatchError(f"{source_dir} is not the checkpoint {out_dir} was converted from (weights hash differs)")
    options = options or ConversionOptions(dtype=config["dtype"], tolerance=config["tolerance"])
    report = Report(config=config, options=options.to_dict())
    _run_checks(report, Path(source_dir), Path(out_dir), source.arch, options, TORCH_DTYPES[config["dtype"]],
                progress or (lambda *a: None), lambda: None)
    report.finish(options.tolerance, LOGITS_REL_FACTOR, KL_LIMIT[options.dtype])
    return report


def _cancellable(progress, cancel_point):
    """A progress callback that is also a cancellation point, for per-layer loops."""
    def report(stage, done, total):
        cancel_point()
        progress(stage, done, total)
    return report


def _write_weights(path, source, head_tensors, dtype, progress, cancel_point):
    """Stream every tensor: source weights (cast to dtype) layer by layer, then head parameters."""
    arch = source.arch
    layout, plan = {}, []
    shapes = expected_shapes(arch)
    for name in source.names():
        layout[runtime_name(name)] = (dtype, shapes[name])
        plan.append((runtime_name(name), name, None))
    for i, tensors in enumerate(head_tensors):
        for suffix, tensor in tensors.items():
            layout[f"layers.{i}.{suffix}"] = (dtype, tuple(tensor.shape))
            plan.append((f"layers.{i}.{suffix}", None, tensor))
    with StreamingSafetensorsWriter(path, layout, metadata={"format": FORMAT_NAME}) as writer:
        done_layers = -1
        for runtime, canonical, tensor in plan:
            if canonical is not None:
                tensor = source.tensor(canonical).to(dtype)
                layer = int(canonical.split(".")[1]) if canonical.startswith("layers.") else None
                if layer is not None and layer > done_layers:
                    cancel_point()
                    done_layers = layer
                    progress("converting", layer + 1, arch["n_layers"])
            writer.write(runtime, tensor)


def _run_checks(report, source_dir, out, arch, options, dtype, progress, cancel_point):
    reference = checks.load_reference(source_dir, arch, dtype)
    converted = load_converted(out, device="cpu")
    generator = torch.Generator().manual_seed(options.seed + 1)
    seq_len = min(options.seq_len, arch["max_positions"])
    tokens = torch.randint(0, arch["vocab_size"], (2, seq_len), generator=generator)
    if "local" in options.checks:
        report.local = checks.local_errors(converted, reference, arch, tokens, _cancellable(progress, cancel_point))
    if "propagated" in options.checks:
        cancel_point()
        report.propagated = checks.propagated_errors(converted, reference, arch, tokens)
    if "greedy" in options.checks and arch["lm_head"] != "none" and options.greedy_tokens:
        cancel_point()
        prompt_len = min(8, arch["max_positions"] - options.greedy_tokens)
        if prompt_len >= 1:
            report.greedy = checks.greedy_agreement(converted, reference, tokens[:1, :prompt_len], options.greedy_tokens)
