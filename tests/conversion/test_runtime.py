"""The runtime: attention and normalisation only, loads without transformers, the fast
path agrees with the dense reference on whole models, cached decoding agrees with full
forward passes, and the checkpoint is about the size of its source."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shared.conversion import convert, load_converted
from shared.conversion.errors import ConversionError
from shared.conversion.model import HeadGroup, Norm, ProductSublayer, SourceAttention

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(source_dirs, tmp_path_factory, fast_options):
    out = {}
    for name in ("gpt2-gelu_new", "llama-gqa", "bert"):
        out[name] = tmp_path_factory.mktemp(name) / "out"
        convert(source_dirs(name), out[name], fast_options(checks=[]))
    return out


@pytest.mark.parametrize("name", ["gpt2-gelu_new", "llama-gqa", "bert"])
def test_only_attention_and_norms(converted, name):
    model = load_converted(converted[name], device="cpu")
    allowed = (torch.nn.Linear, torch.nn.Embedding, torch.nn.ModuleList, Norm, SourceAttention, HeadGroup, ProductSublayer)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert leaves and all(isinstance(m, allowed) for m in leaves), {type(m).__name__ for m in leaves}
    # no activation module anywhere: every non-linearity is a softmax over heads
    names = {type(m).__name__ for m in model.modules()}
    assert not names & {"GELU", "ReLU", "SiLU", "GELUActivation", "NewGELUActivation", "MLP"}


@pytest.mark.parametrize("name", ["gpt2-gelu_new", "llama-gqa", "bert"])
def test_fast_path_matches_dense_reference(converted, name):
    fast = load_converted(converted[name], device="cpu")
    dense = load_converted(converted[name], device="cpu", head_impl="dense").double()
    for length in (1, 9, 40):
        tokens = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
        ref = dense(tokens)
        assert ((fast(tokens).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", ["gpt2-gelu_new", "llama-gqa"])
def test_cached_decoding_matches_full_forward(converted, name):
    model = load_converted(converted[name], device="cpu")
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    full = model(tokens)
    caches = [block.new_cache() for block in model.layers]
    stepped = torch.cat([model(tokens[:, i:i + 1], start=i, caches=caches) for i in range(24)], dim=1)
    assert ((stepped - full).abs().max() / full.abs().max()).item() <= 1e-5


def test_loads_without_transformers(converted):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch\nfrom shared.conversion import load_converted\n"
            f"m = load_converted({str(converted['llama-gqa'])!r}, device='cpu')\n"
            "print(m(torch.tensor([[1, 2, 3]])).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 3, 97])" in done.stdout


@pytest.mark.parametrize("name", ["gpt2-gelu_new", "llama-gqa", "bert"])
def test_checkpoint_is_factored_and_about_source_size(converted, source_dirs, name):
    config = json.loads((converted[name] / "config.json").read_text())
    assert config["format"] == "attention-only-transformer" and config["format_version"] == 1
    assert len(config["source"]["weights_sha256"]) == 64
    for layer in config["layers"]:
        kinds = [s["kind"] for s in layer["sublayers"]]
        assert kinds in (["attention", "neuron"], ["attention", "gate", "product"])
        for sub in layer["sublayers"][1:]:
            assert sub["omega"] > 0 and sub["heads"] > 0
    with safe_open(str(converted[name] / "model.safetensors"), "pt") as f:
        largest = max(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys())
    d, ffn = config["model"]["d_model"], config["model"]["ffn"]["width"]
    assert largest <= max(config["model"]["vocab_size"], ffn) * max(d, ffn), "no D'xD' matrix per head"
    ratio = (converted[name] / "model.safetensors").stat().st_size / (source_dirs(name) / "model.safetensors").stat().st_size
    # a, c, g per head are 3·M·F numbers per layer: about 1% of a GPT-2-small layer, more of a
    # toy one (bench/ measures the ratio at real sizes)
    assert ratio <= 1.2, ratio


def test_corrupt_converted_checkpoint(converted, tmp_path):
    import shutil
    broken = shutil.copytree(converted["gpt2-gelu_new"], tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as caught:
        load_converted(broken)
    assert caught.value.code == "invalid_converted_checkpoint"
    with pytest.raises(ConversionError):
        load_converted(tmp_path / "nothing")
