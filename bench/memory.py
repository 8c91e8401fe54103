"""Peak memory, time per stage and bytes of a conversion, for LLaMA- and Mixtral-shaped checkpoints
that are written straight to disk, tensor by tensor (the model is never built in memory).

* Checkpoints (bench/synthetic_checkpoint.py): config.json (transformers' LlamaConfig,
  architectures ["LlamaForCausalLM"]) and safetensors shards written by a streaming writer
  (8-byte little-endian header length, JSON header, then the raw bytes of one tensor after
  another); tensors named exactly as LlamaForCausalLM's state dict, random normal values
  generated in chunks in the storage dtype: std 0.02 for weights, 1 + 0.02 N(0, 1) for the
  RMSNorm weights; lm_head untied. Mixtral-shaped (MixtralConfig, ["MixtralForCausalLM"]): the
  same with every MLP a router (E x D) and the experts fused as transformers' state dict names
  them (gate_up_proj E x 2F x D, down_proj E x D x F); checkpoints on the Hub store experts one
  by one, which the converter loads whole through transformers instead
  (shared/conversion/weights.py), so they are not what this measures.
* Conversion: convert(src, out, ConversionOptions(...)) with all three checks, in a child
  process (a fresh interpreter per model). The parent polls /proc/<child>/status every 50 ms
  (RssAnon, RssFile, VmHWM) and keeps the maxima, overall and per phase of the conversion (the
  child reports its phases: the converter's progress stages plus wrapped calls to
  checks.run / checks.greedy / load_converted / SourceCheckpoint.weights_sha256). The child
  reports its own VmHWM at the end.
* Baseline: a child that only imports torch, transformers, accelerate and shared.conversion;
  its RssAnon is subtracted ("net").
* Reference for the peak: the largest module's bytes in float32 (the embedding / lm_head, V x D,
  or a Mixtral-shaped MLP with all its experts) + activations (logits N x V x 4, one block's input
  and output 2 x N x D x 4, three float64 N x F intermediates of one MLP, x top_k for experts),
  N = calibration tokens. An estimate of what a one-module-at-a-time conversion must hold, not a
  proof of a bound; the issue's target is net / ref <= 3, the same at every depth.
* Bytes: converted *.safetensors bytes / source *.safetensors bytes; and whether every source
  tensor kept its dtype and shape in the converted files.

    .venv/bin/python bench/memory.py --threads 1                 # the default table (~8 min)
    .venv/bin/python bench/memory.py --quick                     # tiny shapes, plumbing only
    .venv/bin/python bench/memory.py --size 8b --threads 1       # Llama-3-8B shape, ~16 GB bf16 on disk, ~32 min
    .venv/bin/python bench/memory.py --size moe --threads 1      # Mixtral shape at D=1024, 16 layers, 2.83 GiB bf16
    .venv/bin/python bench/memory.py --size moe-depth --threads 1  # Mixtral shape, D=512, 4 vs 16 layers
    .venv/bin/python bench/memory.py --size 8b --workdir /big/dir --keep

--workdir DIR keeps nothing unless --keep is given (files are removed at the end, also on
SIGTERM/SIGINT, e.g. from `timeout`); the default is a temporary directory under /tmp.
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import GiB, fmt_bytes  # noqa: E402
from bench.synthetic_checkpoint import (  # noqa: E402
    SHORT, Shape, dtype_check, safetensors_bytes, write_checkpoint,
)

EVENT = "@@MEM "
POLL_S = 0.05
FLAT_LIMIT = 0.10  # 64 layers vs 4 layers, peak RssAnon net of baseline
BYTES_LIMIT = 1.02



def width(layers, dtype):
    return Shape(f"L{layers}-{SHORT[dtype]}", hidden=1024, intermediate=2816, layers=layers, heads=16, kv_heads=8,
                 vocab=32000, dtype=dtype)


DEFAULT_MODELS = [width(4, "bfloat16"), width(16, "bfloat16"), width(64, "bfloat16"),
                  width(4, "float16"), width(4, "float32")]
QUICK_MODELS = [Shape(f"tiny-L{L}-{SHORT[d]}", hidden=64, intermediate=176, layers=L, heads=4, kv_heads=2, vocab=1000,
                      dtype=d, max_positions=256) for L, d in ((1, "bfloat16"), (4, "bfloat16"), (1, "float32"))]
LLAMA3_8B = Shape("llama3-8b-shape-bf16", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                  dtype="bfloat16", max_positions=8192, rope_theta=500000.0, bos=128000, eos=128001)
# Mixtral-8x7B's proportions (F = 3.5 D, 8 experts, top 2, 4:1 query:KV heads) at D=1024, 16 layers:
# 1.52B parameters, 2.83 GiB bf16, sized to convert with all checks in ~15 min on 2 shared cores
MIXTRAL_SHAPE = Shape("mixtral-shape-D1024-L16-bf16", hidden=1024, intermediate=3584, layers=16, heads=16, kv_heads=4,
                      vocab=32000, dtype="bfloat16", max_positions=4096, rope_theta=1e6, experts=8)
MOE_DEPTH_MODELS = [Shape(f"moe-D512-L{L}-bf16", hidden=512, intermediate=1792, layers=L, heads=8, kv_heads=2,
                          vocab=32000, dtype="bfloat16", max_positions=4096, rope_theta=1e6, experts=8)
                    for L in (4, 16)]

OPTIONS = {"default": dict(calibration_tokens=256, seq_len=64, greedy_tokens=8, checks=["local", "propagated", "greedy"]),
           "quick": dict(calibration_tokens=32, seq_len=16, greedy_tokens=4, checks=["local", "propagated", "greedy"]),
           "8b": dict(calibration_tokens=64, seq_len=32, greedy_tokens=4, checks=["local", "propagated", "greedy"]),
           # routing spreads 256 tokens x top 2 over 8 experts: ~64 tokens per expert, as the dense default's
           # calibration sees per site 256; fewer greedy tokens (each step reloads every expert)
           "moe": dict(calibration_tokens=256, seq_len=64, greedy_tokens=4, checks=["local", "propagated", "greedy"])}


# --- the child processes -----------------------------------------------------------------

def _status():
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _emit(kind, **fields):
    print(EVENT + json.dumps({"t": time.time(), "kind": kind, **fields}), flush=True)


def child_baseline():
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import shared.conversion  # noqa: F401
    time.sleep(0.3)  # let the parent's poller see it too
    _emit("result", status=_status())


def child_convert(src, out, options_json):
    t0 = time.perf_counter()
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import shared.conversion  # noqa: F401
    import importlib

    from shared.conversion import ConversionOptions, checks, convert
    convert_module = importlib.import_module("shared.conversion.convert")  # the module, not the function
    from shared.conversion.checkpoint import SourceCheckpoint
    _emit("phase", phase="imported", import_s=time.perf_counter() - t0)

    state = {"stage": None, "runs": 0}

    def phase(name):
        _emit("phase", phase=name)

    def progress(stage, done, total):
        if stage != state["stage"]:
            state["stage"] = stage
            phase({"checking": "checking: reference pass + local"}.get(stage, stage))
        _emit("progress", stage=stage, done=done, total=total)

    def wrap(owner, attr, name, back=None):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            label = name() if callable(name) else name
            phase(label)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _emit("done", what=label, seconds=time.perf_counter() - t)
                if back:
                    phase(back() if callable(back) else back)
        setattr(owner, attr, wrapped)

    def run_label():
        state["runs"] += 1
        return {1: "calibrating", 2: "checking: reference pass + local"}.get(
            state["runs"], "checking: converted forward (propagated)")

    # labels only: the converter's own code runs unchanged
    wrap(checks, "run", run_label)
    wrap(checks, "greedy", "checking: greedy (generate on both + teacher-forced forward)", back="finishing")
    wrap(convert_module, "load_converted", "checking: load_converted(layerwise=True)")
    wrap(SourceCheckpoint, "weights_sha256", "writing: sha256 of the source weights", back="writing")

    options = ConversionOptions(**json.loads(options_json))
    t = time.perf_counter()
    try:
        report = convert(src, out, options, progress=progress)
    except BaseException as exc:
        _emit("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), status=_status(),
              convert_s=time.perf_counter() - t)
        raise SystemExit(3)
    wall = time.perf_counter() - t
    summary = {k: v for k, v in report.summary.items() if k != "failures"}
    _emit("result", passed=report.passed, failures=report.failures, summary=summary, timings=report.timings,
          convert_s=wall, status=_status(), greedy=report.greedy and {k: report.greedy[k] for k in
                                                                        ("identical", "ties", "mismatches", "seconds")})


# --- the parent: run a child, poll its memory --------------------------------------------

def _read_status(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


class Child:
    """A child process whose memory is polled every POLL_S seconds, overall and per phase."""

    current = None  # for the signal handler

    def __init__(self, argv, log, verbose=False, heartbeat=120.0, baseline=0, max_rss=None):
        self.log, self.verbose, self.heartbeat, self.baseline = log, verbose, heartbeat, baseline
        self.max_rss, self.capped = max_rss, None
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self.phase, self.phases, self.order = "starting", {}, []
        self.result, self.error, self.events, self.stderr = None, None, [], []
        self.lock = threading.Lock()
        self.started = time.time()
        self._enter("starting", self.started)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        Child.current = self
        self.readers = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for r in self.readers:
            r.start()

    def _enter(self, phase, t):
        with self.lock:
            if self.order:
                self.phases[self.order[-1]]["seconds"] += t - self.phases[self.order[-1]]["since"]
            self.phase = phase
            entry = self.phases.setdefault(phase, {"seconds": 0.0, "peak_anon": 0})
            entry["since"] = t
            self.order.append(phase)

    def net(self, anon):
        return anon - self.baseline

    def line(self, text):
        elapsed = time.time() - self.started
        self.log(f"[{datetime.datetime.now().strftime('%H:%M:%S')} +{elapsed:7.1f}s] {text} | peak RssAnon so far "
                 f"{fmt_bytes(self.peak['RssAnon'])} (net {fmt_bytes(self.net(self.peak['RssAnon']))}), "
                 f"VmHWM {fmt_bytes(self.peak['VmHWM'])}")

    def _read_stdout(self):
        for raw in self.proc.stdout:
            if not raw.startswith(EVENT):
                if raw.strip():
                    self.log(f"    child: {raw.rstrip()}")
                continue
            event = json.loads(raw[len(EVENT):])
            self.events.append(event)
            kind = event["kind"]
            if kind == "phase":
                if event["phase"] == self.phase:
                    continue
                self._enter(event["phase"], event["t"])
                if event["phase"] == "imported":
                    self.line(f"imported torch/transformers/accelerate/shared.conversion in {event['import_s']:.1f} s")
                else:
                    self.line(f"phase: {event['phase']}")
            elif kind == "progress":
                if self.verbose or event["done"] == event["total"]:
                    self.line(f"  {event['stage']} {event['done']}/{event['total']}")
            elif kind == "done":
                self.line(f"  done: {event['what']} in {event['seconds']:.1f} s")
            elif kind == "result":
                self.result = event
            elif kind == "error":
                self.error = event

    def _read_stderr(self):
        for raw in self.proc.stderr:
            self.stderr.append(raw.rstrip())
            if self.verbose and raw.strip():
                self.log(f"    child stderr: {raw.rstrip()}")

    def wait(self):
        last_beat = time.time()
        while True:
            done = self.proc.poll() is not None
            status = _read_status(self.proc.pid) if not done else {}
            with self.lock:
                for key, value in status.items():
                    self.peak[key] = max(self.peak[key], value)
                if "RssAnon" in status:
                    entry = self.phases[self.phase]
                    entry["peak_anon"] = max(entry["peak_anon"], status["RssAnon"])
            if done:
                break
            if self.max_rss and status.get("RssAnon", 0) > self.max_rss and self.capped is None:
                self.capped = f"RssAnon {fmt_bytes(status['RssAnon'])} > cap {fmt_bytes(self.max_rss)} in phase {self.phase!r}"
                self.line(f"KILLING the child: {self.capped} (--max-rss, to keep the shared machine out of OOM)")
                self.proc.kill()
            if self.heartbeat and time.time() - last_beat >= self.heartbeat:
                last_beat = time.time()
                self.line(f"(still in phase: {self.phase}; RssAnon now {fmt_bytes(status.get('RssAnon', 0))})")
            time.sleep(POLL_S)
        for r in self.readers:
            r.join(timeout=10)
        self._enter("exited", time.time())
        Child.current = None
        if self.result and "status" in self.result:  # the child's own last reading
            own = self.result["status"]
            self.peak["VmHWM"] = max(self.peak["VmHWM"], own.get("VmHWM", 0))
            self.peak["RssAnon"] = max(self.peak["RssAnon"], own.get("RssAnon", 0))
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def phase_table(self):
        return [(name, p["seconds"], p["peak_anon"]) for name, p in self.phases.items()
                if name not in ("starting", "exited")]


def measure_baseline(log, repeats=2):
    values = []
    for _ in range(repeats):
        child = Child([sys.executable, str(Path(__file__).resolve()), "--child", "baseline"], log=lambda s: None,
                      heartbeat=0)
        rc = child.wait()
        if rc != 0:
            raise RuntimeError("baseline child failed:\n" + "\n".join(child.stderr[-20:]))
        own = child.result["status"]
        values.append({"RssAnon": max(own["RssAnon"], child.peak["RssAnon"]), "VmHWM": own["VmHWM"]})
    best = {k: max(v[k] for v in values) for k in ("RssAnon", "VmHWM")}
    log(f"baseline child (imports torch, transformers, accelerate, shared.conversion): RssAnon "
        f"{', '.join(fmt_bytes(v['RssAnon']) for v in values)}; VmHWM {', '.join(fmt_bytes(v['VmHWM']) for v in values)}"
        f"; using the largest RssAnon, {fmt_bytes(best['RssAnon'])}")
    return best


def reference_bytes(shape: Shape, options: dict) -> dict:
    """Largest module in float32 + the activations a pass keeps (see the module docstring)."""
    D, F, V, E = shape.hidden, shape.intermediate, shape.vocab, max(1, shape.experts)
    kv = shape.kv_heads * shape.head_dim
    mlp = 3 * D * F * E + (E * D if shape.experts else 0)
    modules = {"embed_tokens / lm_head": V * D, "decoder layer": 2 * D * D + 2 * kv * D + mlp, "mlp": mlp}
    name, largest = max(modules.items(), key=lambda kv_: kv_[1])
    n_seq = max(1, -(-options["calibration_tokens"] // options["seq_len"]))
    N = n_seq * min(options["seq_len"], shape.max_positions)
    # one block's input and output: the checks no longer keep every block's hidden states
    acts = {"logits": N * V * 4, "hidden states": 2 * N * D * 4, "mlp fp64": 3 * N * F * 8 * (shape.top_k if shape.experts else 1)}
    return {"module": name, "module_bytes": largest * 4, "activations": acts, "tokens": N,
            "total": largest * 4 + sum(acts.values())}


def convert_one(shape: Shape, root: Path, options: dict, baseline: dict, args, log) -> dict:
    src, out = root / f"{shape.name}-src", root / f"{shape.name}-converted"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f"\n[{shape.name}] {shape.describe()}")
    need = shape.weight_bytes() * 2.1
    free = shutil.disk_usage(root).free
    if free < need:
        raise RuntimeError(f"{root} has {fmt_bytes(free)} free; source + converted need ~{fmt_bytes(need)}")
    written = write_checkpoint(shape, src, args.source_shard_bytes, log=lambda s: log(f"  {s}"))
    log(f"  wrote the source in {written['seconds']:.1f} s: {len(written['files'])} file(s), "
        f"{written['bytes']} bytes ({fmt_bytes(written['bytes'])}); disk free under {root}: "
        f"{fmt_bytes(shutil.disk_usage(root).free)}")
    log(f"  converting with ConversionOptions({', '.join(f'{k}={v!r}' for k, v in options.items())}) in a child process")
    started = time.perf_counter()
    child = Child([sys.executable, str(Path(__file__).resolve()), "--child", "convert", str(src), str(out),
                   json.dumps(options)], log=lambda s: log(f"  {s}"), verbose=args.verbose,
                  heartbeat=args.heartbeat, baseline=baseline["RssAnon"], max_rss=args.max_rss)
    rc = child.wait()
    wall = time.perf_counter() - started
    row = {"model": shape.name, "layers": shape.layers, "dtype": shape.dtype, "params": shape.params(),
           "source_bytes": written["bytes"], "wall_s": wall, "rc": rc, "peak": dict(child.peak),
           "peak_net": child.peak["RssAnon"] - baseline["RssAnon"], "phases": child.phase_table(),
           "reference": reference_bytes(shape, options), "write_source_s": written["seconds"]}
    # RssAnon once the converter has read the config and imported the model class (the 'loading'
    # stage: imports of transformers' auto classes and modeling code, before any weight is read)
    row["loaded_level"] = next((p for n, _, p in row["phases"] if n == "loading" and p), None)
    row["above_loaded"] = None if row["loaded_level"] is None else child.peak["RssAnon"] - row["loaded_level"]
    if rc != 0 or child.result is None:
        err = child.error or {}
        row["failed"] = {"phase": child.order[-2] if len(child.order) > 1 else child.phase,
                         "error": err.get("error") or (f"killed by the bench: {child.capped}" if child.capped
                                                       else f"exit code {rc}"), "traceback": err.get("traceback"),
                         "stderr": child.stderr[-20:]}
        log(f"  FAILED (exit {rc}) in phase {row['failed']['phase']!r}: {row['failed']['error']}")
        for line in (err.get("traceback") or "\n".join(child.stderr[-20:])).splitlines()[-15:]:
            log(f"    {line}")
    else:
        res = child.result
        row.update(passed=res["passed"], failures=res["failures"], timings=res["timings"], convert_s=res["convert_s"],
                   summary=res["summary"], greedy=res["greedy"], converted_bytes=safetensors_bytes(out),
                   dtypes=dtype_check(src, out))
        row["bytes_ratio"] = row["converted_bytes"] / row["source_bytes"]
        t = res["timings"]
        log(f"  passed: {res['passed']}{'' if res['passed'] else ' ' + '; '.join(res['failures'])}; "
            f"logits max rel {fmt_e(res['summary'].get('logits_max_rel'))}, max local rel "
            f"{fmt_e(res['summary'].get('max_local_rel'))}, greedy identical {res['summary'].get('greedy_identical')}")
        log(f"  stages: calibrate {t.get('calibrate_s', 0):.1f} s, write {t.get('write_s', 0):.1f} s, check "
            f"{t.get('check_s', 0):.1f} s, total {t.get('total_s', 0):.1f} s; child wall {wall:.1f} s")
        log(f"  peak RssAnon {fmt_bytes(child.peak['RssAnon'])} (net of baseline {fmt_bytes(row['peak_net'])}), "
            f"VmHWM {fmt_bytes(child.peak['VmHWM'])}, peak RssFile {fmt_bytes(child.peak['RssFile'])}; bytes "
            f"{row['converted_bytes']} / {row['source_bytes']} = {row['bytes_ratio']:.5f}; source dtypes and shapes kept: "
            f"{row['dtypes']['kept']}; head tensors {row['dtypes']['head_tensors']} ({', '.join(row['dtypes']['head_dtypes'])}, "
            f"{fmt_bytes(row['dtypes']['head_bytes'])})")
    log("  per phase (time, peak RssAnon net of baseline): " + "; ".join(
        f"{name} {sec:.1f} s {fmt_bytes(peak - baseline['RssAnon']) if peak else '-'}" for name, sec, peak in row["phases"]))
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return row


# --- output --------------------------------------------------------------------------------

def fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def fmt_e(x):
    return "n/a" if x is None else f"{x:.2e}"


def _ratio(a, b):
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def print_tables(rows, baseline, log):
    headers = ["model", "params", "source", "passed", "peak RssAnon", "net of baseline", "VmHWM",
               "ref: module fp32 + acts", "net / ref", "above 'loading'", "above / ref", "calibrate", "write", "check", "total", "child wall",
               "bytes ratio", "dtype kept"]
    table = []
    for r in rows:
        ref = r["reference"]
        if "failed" in r:
            table.append([r["model"], fmt_params(r['params']), fmt_bytes(r["source_bytes"]),
                          f"FAILED in {r['failed']['phase']}", fmt_bytes(r["peak"]["RssAnon"]), fmt_bytes(r["peak_net"]),
                          fmt_bytes(r["peak"]["VmHWM"]), fmt_bytes(ref["total"]), f"{r['peak_net'] / ref['total']:.2f}x",
                          fmt_bytes(r["above_loaded"]), _ratio(r["above_loaded"], ref["total"]),
                          "", "", "", "", f"{r['wall_s']:.1f} s", "", ""])
            continue
        t = r["timings"]
        table.append([r["model"], fmt_params(r['params']), fmt_bytes(r["source_bytes"]),
                      "yes" if r["passed"] else "NO", fmt_bytes(r["peak"]["RssAnon"]), fmt_bytes(r["peak_net"]),
                      fmt_bytes(r["peak"]["VmHWM"]), fmt_bytes(ref["total"]), f"{r['peak_net'] / ref['total']:.2f}x",
                      fmt_bytes(r["above_loaded"]), _ratio(r["above_loaded"], ref["total"]),
                      f"{t.get('calibrate_s', 0):.1f} s", f"{t.get('write_s', 0):.1f} s", f"{t.get('check_s', 0):.1f} s",
                      f"{t.get('total_s', 0):.1f} s", f"{r['wall_s']:.1f} s", f"{r['bytes_ratio']:.5f}",
                      "yes" if r["dtypes"]["kept"] else "NO"])
    log(f"\n== memory and dtype: peak of the conversion child (polled every {POLL_S * 1e3:.0f} ms), baseline RssAnon "
        f"{fmt_bytes(baseline['RssAnon'])} ==")
    log(common.format_table(headers, table))
    log("ref = largest module in float32 + activations: " + "; ".join(
        f"{r['model']}: {r['reference']['module']} {fmt_bytes(r['reference']['module_bytes'])} + "
        + " + ".join(f"{k} {fmt_bytes(v)}" for k, v in r["reference"]["activations"].items())
        + f" (N={r['reference']['tokens']})" for r in rows))
    names = []
    for r in rows:
        for name, _, _ in r["phases"]:
            if name not in names:
                names.append(name)
    ptable = [[r["model"]] + [next((f"{fmt_bytes(p - baseline['RssAnon'])} / {s:.1f} s" for n, s, p in r["phases"]
                                    if n == name and p), "-") for name in names] for r in rows]
    log("\n== per phase: peak RssAnon net of baseline / time in phase ==")
    log(common.format_table(["model"] + names, ptable))


def print_ratios(rows, log):
    ok = [r for r in rows if "failed" not in r]
    lines = []
    for r in ok:
        lines.append((f"{r['model']}: peak RssAnon net / (largest module fp32 + activations)",
                      f"{fmt_bytes(r['peak_net'])} / {fmt_bytes(r['reference']['total'])}",
                      f"{r['peak_net'] / r['reference']['total']:.2f}x", ""))
        lines.append((f"{r['model']}:   same, above the level after 'loading' (imports done)",
                      f"{fmt_bytes(r['above_loaded'])} / {fmt_bytes(r['reference']['total'])}",
                      _ratio(r["above_loaded"], r["reference"]["total"]), ""))
    by = {(r["layers"], r["dtype"]): r for r in rows}
    small, deep = by.get((4, "bfloat16")), by.get((64, "bfloat16")) or by.get((16, "bfloat16"))
    if small and deep:
        growth = deep["peak_net"] / small["peak_net"] - 1
        lines.append((f"flat in depth: peak RssAnon net, {deep['layers']} vs 4 layers (bf16)",
                      f"{fmt_bytes(deep['peak_net'])} vs {fmt_bytes(small['peak_net'])}", f"{growth:+.1%}",
                      "yes" if growth <= FLAT_LIMIT else "NO"))
        mid = by.get((16, "bfloat16"))
        if mid and mid is not deep:
            lines.append(("  16 vs 4 layers (bf16)", f"{fmt_bytes(mid['peak_net'])} vs {fmt_bytes(small['peak_net'])}",
                          f"{mid['peak_net'] / small['peak_net'] - 1:+.1%}", ""))
        if deep.get("above_loaded") and small.get("above_loaded"):
            lines.append((f"  {deep['layers']} vs 4 layers, above the level after 'loading'",
                          f"{fmt_bytes(deep['above_loaded'])} vs {fmt_bytes(small['above_loaded'])}",
                          f"{deep['above_loaded'] / small['above_loaded'] - 1:+.1%}", ""))
        per_layer = (deep["peak_net"] - small["peak_net"]) / (deep["layers"] - small["layers"])
        lines.append((f"  growth per added layer ({deep['layers']} vs 4)", fmt_bytes(per_layer), "", ""))
    for r in ok:
        lines.append((f"{r['model']}: converted / source weights bytes", f"{r['converted_bytes']} / {r['source_bytes']}",
                      f"{r['bytes_ratio']:.5f}", "yes" if r["bytes_ratio"] <= BYTES_LIMIT else "NO"))
    for r in ok:
        lines.append((f"{r['model']}: source dtype ({r['dtype']}) kept, heads float32",
                      f"{'kept' if r['dtypes']['kept'] else 'changed: ' + ', '.join(r['dtypes']['changed'])}; heads "
                      f"{', '.join(r['dtypes']['head_dtypes'])}", "", "yes" if r["dtypes"]["kept"] and
                      r["dtypes"]["head_dtypes"] == ["F32"] else "NO"))
    for r in rows:
        if "failed" in r:
            lines.append((f"{r['model']}: conversion", f"FAILED in {r['failed']['phase']}: {r['failed']['error']}", "", "NO"))
    log("\n== ratios (this run) ==")
    log(common.format_table(["metric", "measured", "ratio", f"ok (flat <= +{FLAT_LIMIT:.0%}, bytes <= {BYTES_LIMIT})"],
                            lines))


# --- main ----------------------------------------------------------------------------------

def _meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Terminated(Exception):
    pass


def _on_signal(signum, frame):
    raise Terminated(f"signal {signum}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["default", "8b", "moe", "moe-depth"], default="default")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (plumbing only)")
    parser.add_argument("--only", default=None, help="comma-separated model names of the default table")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the source and converted checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the children")
    parser.add_argument("--calibration-tokens", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--greedy-tokens", type=int, default=None)
    parser.add_argument("--source-shard-bytes", type=int, default=5 * 10**9, help="shard size of the written sources")
    parser.add_argument("--verbose", action="store_true", help="print every progress event (default with --size 8b)")
    parser.add_argument("--heartbeat", type=float, default=120.0, help="seconds between 'still running' lines (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--max-rss", type=float, default=None,
                        help="GiB of RssAnon at which the conversion child is killed (default: MemAvailable - 2 GiB)")
    parser.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the children (baseline too), e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child[0] == "baseline":
            return child_baseline()
        return child_convert(*args.child[1:])
    if args.threads:
        common.set_threads(args.threads)
    for item in args.child_env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    args.max_rss = int(args.max_rss * GiB) if args.max_rss else max(GiB, _meminfo("MemAvailable") - 2 * GiB)

    def log(text):
        print(text, flush=True)

    if args.size == "8b":
        models, options = [LLAMA3_8B], dict(OPTIONS["8b"])
        args.verbose = True
    elif args.size in ("moe", "moe-depth"):
        models, options = ([MIXTRAL_SHAPE] if args.size == "moe" else MOE_DEPTH_MODELS), dict(OPTIONS["moe"])
    elif args.quick:
        models, options = QUICK_MODELS, dict(OPTIONS["quick"])
    else:
        models, options = DEFAULT_MODELS, dict(OPTIONS["default"])
    if args.only:
        wanted = args.only.split(",")
        models = [m for m in models if m.name in wanted]
    for key, value in (("calibration_tokens", args.calibration_tokens), ("seq_len", args.seq_len),
                       ("greedy_tokens", args.greedy_tokens)):
        if value is not None:
            options[key] = value

    signal.signal(signal.SIGTERM, _on_signal)
    log(common.machine_line())
    log(common.code_line())
    log(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    log(f"memory: MemTotal {fmt_bytes(_meminfo('MemTotal'))}, MemAvailable {fmt_bytes(_meminfo('MemAvailable'))}; "
        f"a child is killed above RssAnon {fmt_bytes(args.max_rss)}"
        + (f"; children's extra environment: {' '.join(args.child_env)}" if args.child_env else ""))
    made_root = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="attnonly-memory-", dir="/tmp")) if made_root else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    log(f"workdir {root} ({fmt_bytes(shutil.disk_usage(root).free)} free); files "
        f"{'kept' if args.keep else 'removed after each model'}")
    rows, started = [], time.perf_counter()
    try:
        baseline = measure_baseline(log)
        for shape in models:
            rows.append(convert_one(shape, root, options, baseline, args, log))
    except (Terminated, KeyboardInterrupt) as exc:
        log(f"\nINTERRUPTED ({exc}) after {time.perf_counter() - started:.0f} s")
        child = Child.current
        if child is not None:
            child.line(f"interrupted in phase {child.phase!r}")
            log("  per phase so far (time, peak RssAnon net of baseline): " + "; ".join(
                f"{n} {s:.1f} s {fmt_bytes(p - baseline['RssAnon']) if p else '-'}" for n, s, p in child.phase_table()))
            child.kill()
        return 2
    finally:
        if made_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.keep:
            for shape in models:
                shutil.rmtree(root / f"{shape.name}-src", ignore_errors=True)
                shutil.rmtree(root / f"{shape.name}-converted", ignore_errors=True)
        if rows:
            print_tables(rows, baseline, log)
            print_ratios(rows, log)
            if args.json:
                args.json.write_text(json.dumps({"baseline": baseline, "options": options, "rows": rows}, indent=2,
                                                default=str))
        log(f"\n{common.machine_line()}\ntotal {time.perf_counter() - started:.0f} s")
    return 0 if all("failed" not in r and r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
