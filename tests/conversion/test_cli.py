"""The CLI as a user runs it: python -m shared.conversion convert / check / generate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import build_model

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "shared.conversion", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_convert_check_generate(source_dirs, tmp_path):
    out = tmp_path / "out"
    done = run_cli("convert", source_dirs("llama-gqa"), out, "--tolerance", "1e-5", "--calibration-tokens", "64",
                   "--seq-len", "16", "--greedy-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "verdict" in done.stdout and "PASSED" in done.stdout
    assert "calibrating" in done.stderr and "checking" in done.stderr  # the progress bars
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["passed"] and len(report["checks"]["local"]) == 2

    checked = run_cli("check", out, source_dirs("llama-gqa"))
    assert checked.returncode == 0, checked.stderr
    assert "PASSED" in checked.stdout

    generated = run_cli("generate", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "6")
    assert generated.returncode == 0, generated.stderr
    ids = [int(t) for t in generated.stdout.strip().split(",")]
    prompt = torch.tensor([[1, 2, 3]])
    expected = build_model("llama-gqa").generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                 max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ids == expected[0].tolist()


def test_float64_and_errors(source_dirs, tmp_path):
    out = tmp_path / "out64"
    done = run_cli("convert", source_dirs("gpt2-silu"), out, "--dtype", "float64", "--calibration-tokens", "32",
                   "--seq-len", "16", "--greedy-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["attention_only"]["compute_dtype"] == "float64"

    missing = run_cli("convert", tmp_path / "nowhere", tmp_path / "x")
    assert missing.returncode == 2
    assert "error [source_missing_file]" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x").exists()

    wrong_source = run_cli("check", out, source_dirs("llama-gqa"))
    assert wrong_source.returncode == 2 and "source_mismatch" in wrong_source.stderr

    patterns = run_cli("architectures")
    assert patterns.returncode == 0 and "kind=gated" in patterns.stdout and "up=c_fc" in patterns.stdout

    bad_ids = run_cli("generate", out, "--prompt-ids", "1,x")
    assert bad_ids.returncode == 2 and "Traceback" not in bad_ids.stderr
