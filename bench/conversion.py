"""Conversion wall time vs a plain copy of the same checkpoint, and peak RSS vs checkpoint size.

* Copy: shutil.copyfile of every file of the source directory into a new directory,
  repeated before and after the conversions; the median of all copies is the reference.
  (The source is in the page cache for both: it was just written, and every run reads it.)
* Conversion: convert(src, out, ConversionOptions(checks=[], calibration_tokens=256,
  seq_len=64)) in a fresh child process per repeat; wall time of the convert() call only
  (torch and shared.conversion imported before it; the transformers modeling modules that
  convert() imports count); median. The child also reports where the time went, from
  report.timings (calibrate_s: running the source and planning every site, activation fits
  included; write_s: streaming the weights) and by wrapping construct.mixture_for (the
  activation fits), StreamingSafetensorsWriter.write, and host.model_class + host.is_causal
  (finding the source's transformers class: imports transformers' modeling modules).
* Peak RSS: in each child VmHWM from /proc/self/status, raw, and net of a baseline child
  that only imports torch + shared.conversion; a sampling thread also records the peak
  anonymous and file-backed (memory-mapped safetensors) parts. Checkpoint size =
  model.safetensors bytes (all shards). (ru_maxrss is printed too but not used: on Linux a
  child's ru_maxrss starts from its parent's peak at fork and survives exec, so a child forked
  from this parent, which has just built the model, reports the parent's ~1 GB.)

    .venv/bin/python bench/conversion.py            # GPT-2-small, all 12 layers (~500 MB fp32)
    .venv/bin/python bench/conversion.py --quick    # tiny smoke run
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

TARGET_TIME, TARGET_RSS = 2.0, 1.5
RESULT_TAG = "CHILD_RESULT "


def extra_args(parser):
    parser.add_argument("--repeats", type=int, default=None, help="conversions (children) to run")
    parser.add_argument("--model", default=None, help="model name from bench/common.py MODELS")
    parser.add_argument("--child", nargs="+", default=None, help=argparse_hidden())


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


# --- the child process -------------------------------------------------------------------

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler(threading.Thread):
    """Polls /proc/self/status: peak RssAnon and RssFile (kB) while the conversion runs."""

    def __init__(self, interval=0.005):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak = interval, threading.Event(), {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.stop.is_set():
            for field in self.peak:
                self.peak[field] = max(self.peak[field], _status_kb(field))
            time.sleep(self.interval)


def child(args):
    import resource
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import shared.conversion  # noqa: F401
    result = {"import_s": time.perf_counter() - t0}
    if args[0] == "convert":
        from shared.conversion import ConversionOptions, construct, convert, host
        from shared.conversion import format as format_module
        src, out = args[1], args[2]
        fit = {}
        sampler = _Sampler()
        sampler.start()
        # where the time goes, by wrapping library functions (looked up at call time, so wrappable)
        spans = [(construct, "mixture_for", "fit_s"), (format_module.StreamingSafetensorsWriter, "write", "writer_s"),
                 (host, "model_class", "class_s"), (host, "is_causal", "class_s")]
        with common.accumulate_time(spans, fit):
            t = time.perf_counter()
            report = convert(src, out, ConversionOptions(**common.CONVERT_OPTIONS))
            result["convert_s"] = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        result.update(timings=report.timings, fit_s=fit.get("fit_s", 0.0), writer_s=fit.get("writer_s", 0.0),
                      class_s=fit.get("class_s", 0.0),
                      peak_anon_bytes=sampler.peak["RssAnon"] * 1024, peak_file_bytes=sampler.peak["RssFile"] * 1024)
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    result["vmhwm_bytes"] = _status_kb("VmHWM") * 1024
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(*args):
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)],
                          capture_output=True, text=True, cwd=common.ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    line = [l for l in done.stdout.splitlines() if l.startswith(RESULT_TAG)][-1]
    return json.loads(line[len(RESULT_TAG):])


# --- the parent --------------------------------------------------------------------------

def copy_once(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    dst.mkdir()
    for path in sorted(src.iterdir()):
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst)
    return seconds


def mb(n):
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv=None):
    args = common.parse_args("conversion time vs copy, peak RSS vs checkpoint size", argv, extra_args)
    if args.child:
        return child(args.child)
    name = args.model or common.CONVERSION_MODEL[args.quick]
    repeats = args.repeats or (1 if args.quick else 3)
    copies = 2 if args.quick else 3
    print(common.machine_line())
    print(common.code_line())
    print(common.NO_GPU_NOTE)
    with common.workdir(args.workdir) as root:
        free = shutil.disk_usage(root).free
        print(f"\n[{name}] {common.MODELS[name][3]}; disk free under {root}: {mb(free)}")
        src, cached_out = common.prepare(name, root, converted=False)
        ckpt = common.file_bytes(src)
        total_src = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
        if free < 4 * total_src:
            raise SystemExit(f"not enough disk: need ~{mb(4 * total_src)}, have {mb(free)}")
        print(f"  checkpoint: model.safetensors {ckpt} bytes ({mb(ckpt)}); all files {total_src} bytes")
        scratch = root / name / "bench-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()

        copy_before = [copy_once(src, scratch / f"copy-before-{i}") for i in range(copies)]
        baselines, conversions = [], []
        for i in range(repeats):
            baselines.append(run_child("baseline"))
            out = scratch / f"converted-{i}"
            conversions.append(run_child("convert", src, out))
            if i < repeats - 1 or (cached_out / "config.json").is_file():
                shutil.rmtree(out)
            else:
                shutil.rmtree(cached_out, ignore_errors=True)
                out.rename(cached_out)  # kept for bench/bytes.py
        copy_after = [copy_once(src, scratch / f"copy-after-{i}") for i in range(copies)]
        shutil.rmtree(scratch, ignore_errors=True)

    copy_s = common.median(copy_before + copy_after)
    conv_s = common.median([c["convert_s"] for c in conversions])
    rss = common.median([c["vmhwm_bytes"] for c in conversions])
    base = common.median([b["vmhwm_bytes"] for b in baselines])
    peak_anon = common.median([c["peak_anon_bytes"] for c in conversions])
    peak_file = common.median([c["peak_file_bytes"] for c in conversions])
    print(f"  copies before: {', '.join(common.fmt_s(s) for s in copy_before)}; "
          f"after: {', '.join(common.fmt_s(s) for s in copy_after)}")
    print(f"  conversions: {', '.join(common.fmt_s(c['convert_s']) for c in conversions)}")
    for i, c in enumerate(conversions):
        cal_i, write_i = c["timings"]["calibrate_s"], c["timings"]["write_s"]
        print(f"  conversion {i + 1} split: calibrate {common.fmt_s(cal_i)} (of which activation fits "
              f"{common.fmt_s(c['fit_s'])}), stream weights {common.fmt_s(write_i)} (of which "
              f"StreamingSafetensorsWriter.write {common.fmt_s(c['writer_s'])}, reading + casting source tensors "
              f"and the rest {common.fmt_s(write_i - c['writer_s'])}), load/other "
              f"{common.fmt_s(c['convert_s'] - cal_i - write_i)} (of which finding the transformers class, "
              f"imports included, {common.fmt_s(c['class_s'])})")
    print(f"  peak RSS (VmHWM): conversion child {', '.join(mb(c['vmhwm_bytes']) for c in conversions)}; "
          f"baseline child (import torch + shared.conversion) {', '.join(mb(b['vmhwm_bytes']) for b in baselines)}")
    print(f"  (ru_maxrss, inherited from this {mb(_status_kb('VmHWM') * 1024)} parent at fork, not used: conversion "
          f"{', '.join(mb(c['maxrss_bytes']) for c in conversions)}; baseline {', '.join(mb(b['maxrss_bytes']) for b in baselines)})")
    print(f"  sampled peaks in the conversion child: anonymous {mb(peak_anon)}, file-backed (mmap) {mb(peak_file)}")
    rows = [
        ["conversion wall / copy", f"{common.fmt_s(conv_s)} / {common.fmt_s(copy_s)}", common.fmt_ratio(conv_s / copy_s),
         f"<= {TARGET_TIME}x"],
        ["peak RSS (VmHWM) raw / checkpoint", f"{mb(rss)} / {mb(ckpt)}", common.fmt_ratio(rss / ckpt), f"<= {TARGET_RSS}x"],
        ["peak RSS (VmHWM) net of baseline / checkpoint", f"({mb(rss)} - {mb(base)}) / {mb(ckpt)}",
         common.fmt_ratio((rss - base) / ckpt), f"<= {TARGET_RSS}x"],
    ]
    common.print_table(f"conversion: {name}, checks=[], {repeats} conversion(s) in fresh processes, "
                       f"{len(copy_before + copy_after)} copies (medians)",
                       ["metric", "measured", "ratio", "target"], rows)
    summary = [
        common.summary_row(f"conversion {name}: wall / plain copy", conv_s / copy_s, TARGET_TIME,
                           f"{common.fmt_s(conv_s)} vs {common.fmt_s(copy_s)}; median activation fits {common.fmt_s(common.median([c['fit_s'] for c in conversions]))}"),
        common.summary_row(f"conversion {name}: peak RSS (VmHWM) raw / checkpoint", rss / ckpt, TARGET_RSS,
                           f"{mb(rss)} vs {mb(ckpt)}"),
        common.summary_row(f"conversion {name}: peak RSS net of import baseline / checkpoint", (rss - base) / ckpt,
                           TARGET_RSS, f"baseline {mb(base)}"),
    ]
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
