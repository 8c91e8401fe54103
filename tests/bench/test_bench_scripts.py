"""Smoke test of bench/: run_all.py --quick --threads 1 runs every benchmark script (forward, generate,
conversion, bytes) on tiny models in its own process; each must print its ratio table, and
run_all the final table. Timings of tiny models mean nothing; only the plumbing is checked."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--threads", "1",
                           "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    return done, time.perf_counter() - started


def test_run_all_quick_succeeds_fast(quick_run):
    done, seconds = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 150, f"bench --quick took {seconds:.0f} s"
    for script in ("forward", "generate", "conversion", "bytes"):
        assert f"##### bench/{script}.py: exit 0" in done.stdout


def test_forward_prints_its_ratio_table(quick_run):
    out = quick_run[0].stdout
    for model in ("gpt2-tiny", "llama-tiny"):
        assert f"== forward: {model}," in out
        for n in (16, 32, 64):
            assert re.search(rf"forward {model} n={n}: fast / source +\| \d+\.\d+x", out), out[-3000:]
            assert f"forward {model} n={n}: fast vs dense (fp32) max rel diff" in out
    assert "== forward ratios" in out
    assert "heads per unit" in out and "plain gelu" in out and "gated silu: gate 1/unit" in out


def test_generate_prints_its_ratio_table(quick_run):
    out = quick_run[0].stdout
    assert "== generate: greedy, 16 new tokens" in out
    for model in ("gpt2-tiny", "llama-tiny"):
        assert re.search(rf"generate {model}: per-token converted / source +\| \d+\.\d+x", out)
        assert f"generate {model}: token sequences identical" in out
        assert f"generate {model}: head-group caches used" in out


def test_conversion_prints_its_ratio_table(quick_run):
    out = quick_run[0].stdout
    assert "== conversion: gpt2-tiny" in out
    for metric in ("conversion wall / copy", "peak RSS (VmHWM) raw / checkpoint",
                   "peak RSS (VmHWM) net of baseline / checkpoint"):
        assert re.search(rf"{re.escape(metric)} +\|.*\| \d+\.\d+x", out), metric


def test_bytes_prints_its_ratio_table(quick_run):
    out = quick_run[0].stdout
    assert "== bytes: model.safetensors" in out
    assert re.search(r"bytes gpt2-tiny: converted / source +\| \d+\.\d+x", out)


def test_final_table_and_no_gpu_note(quick_run):
    out = quick_run[0].stdout
    assert "== final table (quick smoke run" in out
    assert "CUDA/Triton timings were not taken" in out
