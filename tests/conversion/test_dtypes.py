"""Storage dtype follows the source: bf16, fp16 and fp32 sources (LLaMA- and GPT-2-shaped) come
back in their own dtype at <= 1.02x the bytes, with the fidelity targets met in float32 compute;
an fp32 source computed in float64 reaches the float64 targets."""
import json

import pytest
import torch
from safetensors import safe_open

from shared.conversion import ConversionOptions, convert

from .tiny import build, save

SHAPES = {  # wide enough that bytes ratios mean something
    "llama": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  vocab_size=512),
    "gpt2": dict(n_embd=256, n_inner=1024, n_head=4, vocab_size=512),
}


def weights_bytes(directory):
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("family", list(SHAPES))
def test_storage_dtype_and_bytes(family, dtype, tmp_path):
    source = build(family, **SHAPES[family]).to(dtype)
    save(source, tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out",
                     ConversionOptions(calibration_tokens=128, seq_len=32, greedy_tokens=32))
    assert report.passed, report.failures
    section = report.config["attention_only"]
    assert section["storage_dtype"] == str(dtype).replace("torch.", "") and section["compute_dtype"] == "float32"
    ratio = weights_bytes(tmp_path / "out") / weights_bytes(tmp_path / "src")
    assert ratio <= 1.02, ratio
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        for name in f.keys():
            expected = torch.float32 if name.rsplit(".", 1)[-1] in ("a", "c", "g", "eps") else dtype
            assert f.get_slice(name).get_dtype() == {torch.float32: "F32", torch.bfloat16: "BF16",
                                                    torch.float16: "F16"}[expected], name
    logits = report.propagated["logits"]
    assert logits["kl_max"] <= 1e-6 and logits["top1_mismatches"] == 0 and report.greedy["passed"]
    assert report.summary["max_local_rel"] <= 0.5 * section["tolerance"]


@pytest.mark.parametrize("family, activation", [("llama", {}), ("gpt2", dict(activation_function="silu"))])
def test_float64_compute(family, activation, tmp_path):
    source = build(family, **{**SHAPES[family], "vocab_size": 97, **activation})
    save(source, tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out",
                     ConversionOptions(dtype="float64", calibration_tokens=64, seq_len=16, greedy_tokens=8))
    assert report.passed, report.failures
    assert report.summary["max_local_rel"] <= 1e-10
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_only"]["compute_dtype"] == "float64"
