"""convert(): source directory -> converted Hugging Face directory with config, weights, report.

URL-free and service-free: config -> recognise FFNs -> calibrate (verify, plan, re-size) ->
write (streamed) -> check -> report. Every pass over a model loads its weights module by module
(host.offload), so memory stays bounded by the largest module plus activations. Every forward pass
computes on the options' device (resolved once, before any work: device.resolve); plans, head
tensors and what the checks compare across passes are on the CPU.
The output appears atomically: everything is written to a hidden sibling directory that is
renamed into place at the end, and removed on any error or cancellation.
"""
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import allocator, checks, explicit_build, explicit_convert, host, model_card
from .calibrate import Calibrator, LocalCheck, hook_site
from .checkpoint import SourceCheckpoint, storage_dtype
from .device import resolve as resolve_device
from .errors import ConversionCancelled, InvalidOptionsError, SourceMismatchError, UnsupportedArchitectureError
from .format import (CONFIG_FILE, DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, REMOTE_CODE_FILE, REPORT_FILE, SECTION,
                     TOKENIZER_FILES, TORCH_DTYPES, ShardedWriter, read_config, remote_code)
from .inputs import calibration_batch, check_batch, load_tokenizer
from .options import ConversionOptions
from .patterns import find_sites
from .report import Report
from .report_html import render as render_html
from .runtime import load_converted
from .weights import declared_ties, source_weights, tied_aliases

CONVERTER_VERSION = "2.0"
# Thresholds of the verdict, relative to the tolerance where they scale with it.
LOGITS_REL_FACTOR = 10.0  # logits max |Δ| <= 10 * tolerance * max |logit|
KL_LIMIT = {"float32": 1e-6, "float64": 1e-12}
DEFAULT_CONTEXT = 2048  # keys a head may see, for Omega, when the config names no limit


def convert(source_dir, out_dir, options: ConversionOptions | None = None, *, progress=None, should_cancel=None) -> Report:
    options = options or ConversionOptions()
    device = resolve_device(options.device)
    allocator.return_freed_memory()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidOptionsError(f"output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        report = _convert_into(Path(source_dir), staging, options, device, progress or (lambda *a: None),
                               should_cancel or (lambda: False))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class Source:
    """The source checkpoint seen through its transformers class: FFN sites, weights, tokenizer."""

    def __init__(self, directory: Path, options: ConversionOptions, device: torch.device):
        self.directory, self.device = directory, device  # device: where every pass computes
        self.checkpoint = SourceCheckpoint(directory, allow_pickle=options.allow_pickle)
        self.config = host.load_config(directory)
        self.cls = host.model_class(self.config)
        self.encoder_decoder = host.is_encoder_decoder(self.cls, self.config)
        self.causal = host.is_causal(self.cls, self.config)
        self.dtype = TORCH_DTYPES[options.dtype]
        self.storage_dtype = storage_dtype(self.checkpoint)
        shape = host.build_empty(self.cls, self.config, self.dtype)
        self.sites = find_sites(shape, causal=self.causal, encoder_decoder=self.encoder_decoder)
        if not self.sites:
            raise UnsupportedArchitectureError(f"{self.cls.__name__} has no FFN that any known pattern matches")
        self.weights, self.lazy = source_weights(shape, self.checkpoint, self.cls, self.storage_dtype)
        self.probe = host.build_empty(self.cls, self.config, torch.float64)  # sites' float64 evaluations
        self.tokenizer = load_tokenizer(directory)
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.vocab_size = int(text.vocab_size)
        limits = (getattr(text, "max_position_embeddings", None), getattr(text, "n_positions", None))
        # the first positive limit: XLNet's max_position_embeddings is -1 ("no limit")
        self.max_positions = int(next((n for n in limits if isinstance(n, int) and n > 0), DEFAULT_CONTEXT))

    def reference(self):
        """transformers' own model, its weights loaded module by module onto the device as it runs."""
        return host.offload(host.build_empty(self.cls, self.config, self.dtype), self.weights, self.device)


def _convert_into(source_dir: Path, out: Path, options: ConversionOptions, device: torch.device, progress,
                  should_cancel) -> Report:
    started, timings = time.perf_counter(), {}

    def cancel_point():
        if should_cancel():
            raise ConversionCancelled("the conversion was cancelled")

    progress("loading", 0, 1)
    source = Source(source_dir, options, device)
    progress("loading", 1, 1)
    if options.construction == "explicit":  # the size guard, before any calibration
        explicit_build.guard(source.probe, source.sites, source.max_positions, options.explicit_max_params)

    t = time.perf_counter()
    batch = calibration_batch(options, source.tokenizer, source.vocab_size, source.max_positions)
    done = []
    calibrator = Calibrator(source.probe, source.weights, options.tolerance, source.max_positions, source.dtype,
                            source.device,
                            progress=lambda site: _tick(done, "calibrating", len(source.sites), progress, cancel_point))
    reference = source.reference()
    _pass(reference, source.sites, calibrator, batch, source.encoder_decoder, source.device)
    missing = [s.path for s in source.sites if s.path not in calibrator.results]
    if missing:
        raise UnsupportedArchitectureError(f"FFN sites never ran in a forward pass: {missing[:5]}")
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    results = [calibrator.results[s.path] for s in source.sites]
    explicit_tensors, explicit_entry = (explicit_convert.build(source, results, options)
                                        if options.construction == "explicit" else ({}, None))
    config = dict(source.checkpoint.config)
    config[SECTION] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "converter_version": CONVERTER_VERSION,
        "construction": options.construction, "compute_dtype": options.dtype,
        "storage_dtype": DTYPE_NAMES[source.storage_dtype], "head_dtype": "float32", "tolerance": options.tolerance,
        "source": {"architecture": source.cls.__name__, "model_type": source.config.model_type,
                   "weights_sha256": source.checkpoint.weights_sha256(), "weights_bytes": source.checkpoint.total_bytes()},
        "calibration": {**batch.describe(), "seed": options.seed, **_corpus_identity(batch)},
        "sites": [r.plan for r in results],
    }
    if explicit_entry:
        config[SECTION]["explicit"] = explicit_entry
    head_tensors = {f"{host.head_module_names(r.site)}.{name}": tensor for r in results for name, tensor in r.tensors.items()}
    head_tensors.update(explicit_tensors)
    _write(out, source, config, head_tensors, options, progress, cancel_point)
    timings["write_s"] = time.perf_counter() - t

    report = _new_report(config, options, device)
    if options.checks:
        t = time.perf_counter()
        _run_checks(report, source, reference, calibrator.results, out, options, progress, cancel_point)
        timings["check_s"] = time.perf_counter() - t
    report.finish(options.tolerance, LOGITS_REL_FACTOR, KL_LIMIT[options.dtype])
    report.timings = {**timings, "total_s": time.perf_counter() - started}
    name = source.checkpoint.config.get("_name_or_path") or None
    (out / "README.md").write_text(model_card.render(config, report.summary, name if name and "/" in name else None))
    report.files = {p.name: p.stat().st_size for p in out.iterdir()}
    report.files[REPORT_FILE] = report.files["report.html"] = None
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    (out / "report.html").write_text(render_html(report.to_dict()), encoding="utf-8")
    return report


def _new_report(config: dict, options: ConversionOptions, device: torch.device) -> Report:
    """A report whose options name the device the passes ran on (resolved), not the one asked for."""
    return Report(config=config, options={**options.to_dict(), "device": str(device)})


def _corpus_identity(batch) -> dict:
    if batch.kind != "text":
        return {}
    from .corpus import describe

    return {"corpus": describe()}


def _tick(done: list, stage: str, total: int, progress, cancel_point):
    allocator.trim()  # after each FFN site: what its float64 copies used goes back to the system
    cancel_point()
    done.append(1)
    progress(stage, len(done), total)


@torch.no_grad()
def _pass(model, sites, on_inputs, batch, encoder_decoder, device, on_state=None):
    """One forward pass of `model` on `batch`, on `device`, with on_inputs hooked to every site (its
    inputs are on `device`), its hidden states handed to on_state (checks.run); returns the output
    (on the CPU)."""
    handles = [hook_site(model, site, on_inputs) for site in sites]
    try:
        return checks.run(model, batch, encoder_decoder, keep_states=False, on_state=on_state, device=device)
    finally:
        for handle in handles:
            handle.remove()


def _write(out: Path, source: Source, config: dict, head_tensors: dict, options, progress, cancel_point):
    """Stream the source's tensors (own names, own dtype) and the head parameters into shards."""
    converted = host.build_empty(source.cls, source.config, source.dtype)
    sites = find_sites(converted, causal=source.causal, encoder_decoder=source.encoder_decoder)
    host.swap_in(converted, sites, config[SECTION]["sites"], None)
    # tied duplicates are written once; load_converted restores them from the same ties
    aliases = tied_aliases(converted)
    declared = declared_ties(converted)
    if hasattr(source.weights, "names"):  # names that read the same checkpoint tensor as an earlier one
        first = {}
        for n in converted.state_dict():
            hf = source.weights.names.get(n)
            if hf is not None and first.setdefault(hf, n) != n and declared.get(n) == first[hf]:
                aliases[n] = first[hf]
    buffers = {n for n, _ in converted.named_buffers()}
    names = [n for n in converted.state_dict() if n not in aliases and (n in head_tensors or n in source.weights)
             and not (n in buffers and n not in source.weights)]
    names += [n for n in head_tensors if n not in set(names)]  # the explicit form's matrices
    layout = {n: ((head_tensors[n].dtype, tuple(head_tensors[n].shape)) if n in head_tensors else source.weights.info(n))
              for n in names}
    written_layers = set()
    with ShardedWriter(out, layout, options.max_shard_bytes) as writer:
        for name in names:
            layer = _layer_of(name)
            if layer is not None and layer not in written_layers:
                cancel_point()
                written_layers.add(layer)
                progress("writing", len(written_layers), max(s.layer for s in sites) + 1)
            writer.write(name, head_tensors[name] if name in head_tensors else source.weights[name].contiguous())
    code, auto_map = remote_code(source.cls, type(source.config))
    (out / REMOTE_CODE_FILE).write_text(code)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "auto_map": auto_map}, indent=2))
    for name in TOKENIZER_FILES:
        if (source.directory / name).is_file():
            shutil.copyfile(source.directory / name, out / name)


def _layer_of(name: str):
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _run_checks(report, source: Source, reference, results, out, options, progress, cancel_point):
    kind = "text" if source.tokenizer is not None and options.calibration != "random" else "random"
    batch = check_batch(options, source.tokenizer, source.vocab_size, source.max_positions, kind)
    report.check_inputs = batch.describe()
    done = []
    local = LocalCheck(source.probe, source.weights, results, source.dtype, source.device,
                       progress=lambda site: _tick(done, "checking", len(source.sites), progress, cancel_point))
    explicit = None
    if options.construction == "explicit":  # the explicit heads' own local check, in the same pass
        explicit = explicit_convert.LocalCheck(source.probe, source.weights, {p: r.plan for p, r in results.items()},
                                               out, source.dtype, source.device)
    handles = explicit.hooks(reference, source.sites) if explicit else []
    # the reference's hidden states go to a temporary file, not memory (flat in depth)
    stored = checks.StoredStates(batch.attention_mask) if "propagated" in options.checks else None
    try:
        ref_out = _pass(reference, source.sites, local, batch, source.encoder_decoder, source.device, on_state=stored)
    finally:
        for handle in handles:
            handle.remove()
    if "local" in options.checks:
        report.local = [{"site": s.path, "layer": s.layer, "kind": s.pattern.kind,
                         "ffn_rel": (explicit or local).errors[s.path], "calibration_rel": results[s.path].calibration_rel,
                         **({"compact_rel": local.errors[s.path]} if explicit else {})} for s in source.sites]
    converted = load_converted(out, device=source.device, dtype=options.dtype, layerwise=True)
    if "propagated" in options.checks:
        cancel_point()
        residuals = checks.Residuals(stored)
        with torch.no_grad():  # the explicit form compares its hidden states with the compact form's: kept
            ours_out = checks.run(converted, batch, source.encoder_decoder, keep_states=explicit is not None,
                                  on_state=residuals, device=source.device)
        stored.close()
        report.propagated = checks.propagated(ours_out, ref_out, batch.attention_mask, residuals.table())
        if explicit:
            report.propagated["explicit_vs_compact"] = explicit_convert.versus_compact(
                ours_out, out, batch, options, source.encoder_decoder, source.device)
    has_lm_head = getattr(ref_out, "logits", None) is not None
    if "greedy" in options.checks and has_lm_head and options.greedy_tokens and hasattr(converted, "generate"):
        cancel_point()
        prompt_len = min(8, source.max_positions - options.greedy_tokens)
        if prompt_len >= 1:
            prompt = batch.input_ids[:1, :prompt_len].to(source.device)  # generate() computes where its input is
            report.greedy = checks.greedy(converted, reference, prompt, options.greedy_tokens, source.encoder_decoder)


def check(out_dir, source_dir, options: ConversionOptions | None = None, progress=None) -> Report:
    """Re-run the equivalence checks of a converted directory against its source."""
    device = resolve_device(options.device if options else None)  # before any work (the default options name none)
    config = read_config(out_dir)
    section = config[SECTION]
    options = options or ConversionOptions(dtype=section["compute_dtype"], tolerance=section["tolerance"],
                                           construction=section.get("construction", "compact"))
    source = Source(Path(source_dir), options, device)
    if source.checkpoint.weights_sha256() != section["source"]["weights_sha256"]:
        raise SourceMismatchError(f"{source_dir} is not the checkpoint {out_dir} was converted from (weights hash differs)")
    from .calibrate import SiteResult
    from .runtime import site_tensors

    results = {}
    for site, plan in zip(source.sites, section["sites"]):
        results[site.path] = SiteResult(site, plan, site_tensors(out_dir, site), plan.get("calibration_rel", 0.0))
    report = _new_report(config, options, device)
    _run_checks(report, source, source.reference(), results, Path(out_dir), options,
                progress or (lambda *a: None), lambda: None)
    report.finish(options.tolerance, LOGITS_REL_FACTOR, KL_LIMIT[options.dtype])
    return report
