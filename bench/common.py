"""Shared pieces of the benchmark scripts: the random models, building and converting
them (cached in a work directory), timing helpers and the tables they print.

Every script takes --quick (tiny models and sizes, for the smoke test), --workdir (where
source and converted checkpoints are cached; a temporary directory by default) and
--json (write the summary rows that bench/run_all.py collects).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (transformers config class, model class, config kwargs, what it is)
MODELS = {
    "gpt2-small-4L": ("GPT2Config", "GPT2LMHeadModel",
                      dict(n_layer=4, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                      "GPT-2-small widths (D=768, F=3072, 12 heads, vocab 50257), 4 of its 12 layers"),
    "gpt2-small-12L": ("GPT2Config", "GPT2LMHeadModel",
                       dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                       "GPT-2-small, all 12 layers (124M parameters)"),
    "llama-1024-4L": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
                      "LLaMA-shaped: D=1024, F=2816 (SwiGLU), 16 heads / 4 KV heads, vocab 32000, 4 layers"),
    # --quick: tiny stand-ins with the same families and activations
    "gpt2-tiny": ("GPT2Config", "GPT2LMHeadModel",
                  dict(n_layer=1, n_embd=64, n_head=4, vocab_size=1000, n_positions=256),
                  "tiny GPT-2 (quick mode): D=64, 1 layer, vocab 1000"),
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_hidden_layers=1, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256),
                   "tiny LLaMA (quick mode): D=64, F=176, 1 layer, vocab 1000"),
}
FORWARD_MODELS = {False: ["gpt2-small-12L", "llama-1024-4L"], True: ["gpt2-tiny", "llama-tiny"]}
CONVERSION_MODEL = {False: "gpt2-small-12L", True: "gpt2-tiny"}
CONVERT_OPTIONS = dict(checks=[], calibration_tokens=256, seq_len=64)

NO_GPU_NOTE = "CUDA/Triton timings were not taken: this task has no GPU (CPU only)."


def parse_args(description, argv=None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke test)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="cache source/converted checkpoints here (default: a temporary directory, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary rows here (for run_all.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (OMP_NUM_THREADS/MKL_NUM_THREADS, inherited by child processes); "
                             "default: torch's default (all cores)")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    return args


def set_threads(n: int):
    """Before torch is imported (the scripts import it lazily), so that OpenMP and MKL both obey."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def thread_args(args) -> list:
    return ["--threads", str(args.threads)] if args.threads else []


@contextmanager
def workdir(path):
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="attnonly-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def code_line() -> str:
    """Which library code was measured: HEAD plus whether shared/ has uncommitted changes."""
    import hashlib
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    files = [ROOT / "shared" / "conversion" / name for name in ("fastpath.py", "fastpath_pairs.py")]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12] \
        if all(f.is_file() for f in files) else "missing"
    dirty = git("status", "--porcelain", "--", "shared")
    return (f"code: git {git('rev-parse', '--short', 'HEAD')}, shared/ "
            f"{'has uncommitted changes' if dirty else 'clean'}, fastpath{{,_pairs}}.py sha256 {digest}")


def machine_line() -> str:
    import torch
    import transformers
    load = os.getloadavg()
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | {platform.machine()} {os.cpu_count()} CPU cores"
            f" | torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
            f" | CUDA available: {torch.cuda.is_available()} | load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


# --- models ------------------------------------------------------------------------------

def build_source(name: str, directory: Path) -> Path:
    """A random-weight transformers model saved with save_pretrained (fp32 safetensors)."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    config_cls, model_cls, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def convert_source(src: Path, out: Path) -> float:
    from shared.conversion import ConversionOptions, convert
    t = time.perf_counter()
    convert(src, out, ConversionOptions(**CONVERT_OPTIONS))
    return time.perf_counter() - t


def prepare(name: str, root: Path, converted: bool = True, log=print):
    """(source dir, converted dir) for a model, built/converted once per work directory."""
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    src, out = base / "source", base / "converted"
    if not (src / "model.safetensors").is_file():
        t = time.perf_counter()
        build_source(name, src)
        log(f"  built {name} ({MODELS[name][3]}) in {time.perf_counter() - t:.1f} s")
    if converted and not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        seconds = convert_source(src, out)
        log(f"  converted {name} in {seconds:.1f} s ({CONVERT_OPTIONS})")
    return src, out


def load_source(src: Path):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return model.eval()


def load_pair(name: str, root: Path):
    """(source, converted, converted dir) of a benchmark model, built and converted on first use,
    announced with their heads per unit. The converted model is the source's own transformers
    class with head modules in place of its FFNs, on the fast head path."""
    from shared.conversion import load_converted

    src_dir, out_dir = prepare(name, root)
    source = load_source(src_dir)
    converted = load_converted(out_dir, head_impl="fast")
    print(f"\n[{name}] {MODELS[name][3]}")
    print(f"  heads per unit (config.json attention_only.sites): {heads_per_unit(out_dir)}")
    return source, converted, out_dir


def set_head_impl(model, impl: str):
    """"fast" (the O(n) path) or "dense" (one SDPA per head, O(n^2)) on every head module."""
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = impl
    return model


def heads_per_unit(out: Path) -> str:
    """What config.json plans for every FFN site, compactly."""
    sites = json.loads((out / "config.json").read_text())["attention_only"]["sites"]
    descriptions = []
    for site in sites:
        if site["kind"] == "plain":
            descriptions.append(f"plain {site['activation']} {site['heads_per_unit']}/unit")
        else:  # gated, experts: gate heads, then a product pair (2 heads) per unit
            descriptions.append(f"{site['kind']} {site['activation']}: gate {site['heads_per_unit']}/unit "
                                f"+ product pair 2/unit")
    if len(set(descriptions)) == 1:
        return f"{descriptions[0]} (all {len(descriptions)} sites)"
    return "; ".join(f"{site['path']}: {d}" for site, d in zip(sites, descriptions))


def weight_files(directory: Path) -> list:
    """model.safetensors, or its shards (model-0000i-of-0000n.safetensors)."""
    return sorted(directory.glob("model*.safetensors"))


def file_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in weight_files(directory))


# --- timing ------------------------------------------------------------------------------

def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def timed_cpu(fn):
    """(wall seconds, process CPU seconds over all threads, result). CPU time is far less
    sensitive than wall time to other processes competing for the same cores."""
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t, time.process_time() - c, result


def median(values):
    return statistics.median(values)


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@contextmanager
def accumulate_time(targets, totals: dict):
    """Temporarily wrap callables to add their wall time to totals[label].

    targets: [(owner, attribute, label)]. Nested calls of wrapped callables count once.
    """
    depth = [0]
    saved = []

    def wrap(fn, label):
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
                depth[0] -= 1
        return wrapper

    for owner, attribute, label in targets:
        original = getattr(owner, attribute)
        saved.append((owner, attribute, original))
        setattr(owner, attribute, wrap(original, label))
    try:
        yield totals
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


# --- output ------------------------------------------------------------------------------

def format_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cells[0], widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


def print_table(title, headers, rows):
    print(f"\n== {title} ==")
    print(format_table(headers, rows), flush=True)


def summary_row(metric, value, target=None, note="", met=None, target_text=None):
    """One row of run_all.py's final table. value: a ratio (float), or a string."""
    if met is None and target is not None and isinstance(value, (int, float)):
        met = value <= target
    if target_text is None and target is not None:
        target_text = f"<= {target}x"
    return {"metric": metric, "value": value, "target": target_text, "met": met, "note": note}


def write_summary(path, rows):
    if path is not None:
        Path(path).write_text(json.dumps(rows, indent=2))


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def fmt_s(seconds) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


MiB, GiB = 2**20, 2**30


def fmt_bytes(n):
    if n is None:
        return "n/a"
    sign, n = ("-" if n < 0 else ""), abs(n)
    return f"{sign}{n / GiB:.2f} GiB" if n >= GiB else f"{sign}{n / MiB:.0f} MiB"
