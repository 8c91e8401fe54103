"""Bad input: a typed error with a stable code, and no output directory left behind."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from shared.conversion import ConversionOptions, convert
from shared.conversion.errors import ConversionError


def assert_fails_cleanly(source, tmp_path, code, options=None):
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as caught:
        convert(source, out, options or ConversionOptions(calibration_tokens=16, seq_len=8, checks=[]))
    assert caught.value.code == code, caught.value
    assert caught.value.message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no partial directory left"
    return caught.value


def copy_source(source_dirs, name, tmp_path):
    return shutil.copytree(source_dirs(name), tmp_path / "src")


def test_missing_directory(tmp_path):
    assert_fails_cleanly(tmp_path / "nowhere", tmp_path, "source_missing_file")


def test_missing_config(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    (src / "config.json").unlink()
    assert_fails_cleanly(src, tmp_path, "source_missing_file")


def test_missing_weights(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    (src / "model.safetensors").unlink()
    assert_fails_cleanly(src, tmp_path, "source_missing_file")


def test_unknown_model_type_is_unsupported(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["FooForCausalLM"], model_type="foo")
    (src / "config.json").write_text(json.dumps(config))
    error = assert_fails_cleanly(src, tmp_path, "unsupported_architecture")
    assert "foo" in error.message


def test_unknown_activation_is_refused_naming_the_module(source_dirs, tmp_path):
    src = copy_source(source_dirs, "llama-gqa", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["hidden_act"] = "mish"  # x tanh(softplus x): no head construction for it
    (src / "config.json").write_text(json.dumps(config))
    error = assert_fails_cleanly(src, tmp_path, "unsupported_architecture")
    assert "model.layers.0.mlp" in error.message and "Mish" in error.message


def test_a_pattern_that_does_not_hold_is_refused(source_dirs, tmp_path, monkeypatch):
    """Names match the gated pattern but the module computes something else: verified, refused."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 1.001

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    error = assert_fails_cleanly(source_dirs("llama-gqa"), tmp_path, "unsupported_architecture")
    assert "model.layers.0.mlp" in error.message and "differ" in error.message


def test_shape_mismatch(source_dirs, tmp_path):
    src = copy_source(source_dirs, "llama-gqa", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights say 64
    (src / "config.json").write_text(json.dumps(config))
    error = assert_fails_cleanly(src, tmp_path, "shape_mismatch")
    assert "gate_proj" in error.message or "mlp" in error.message


def test_missing_tensor_is_a_shape_mismatch(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["n_layer"] = 3  # the weights hold 2 layers
    (src / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(src, tmp_path, "shape_mismatch")


@pytest.mark.parametrize("keep", [4, 100, -200])
def test_truncated_safetensors(source_dirs, tmp_path, keep):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep > 0 else data[:keep])
    assert_fails_cleanly(src, tmp_path, "corrupt_weights")


def test_config_not_json(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    (src / "config.json").write_text("{not json")
    assert_fails_cleanly(src, tmp_path, "invalid_config")


def test_pickle_refused_unless_allowed(source_dirs, tmp_path):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    assert_fails_cleanly(src, tmp_path, "pickle_not_allowed")
    report = convert(src, tmp_path / "allowed", ConversionOptions(calibration_tokens=16, seq_len=8, checks=[], allow_pickle=True))
    assert (tmp_path / "allowed" / "model.safetensors").is_file() and report.config["attention_only"]["sites"]


def test_pickle_with_payload_is_not_executed(tmp_path, source_dirs):
    src = copy_source(source_dirs, "gpt2-gelu_new", tmp_path)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, src / "pytorch_model.bin")
    options = ConversionOptions(calibration_tokens=16, seq_len=8, checks=[], allow_pickle=True)
    assert_fails_cleanly(src, tmp_path, "corrupt_weights", options)
    assert not marker.exists()


def test_sharded_checkpoint_converts(tmp_path):
    from .conftest import build_model
    model = build_model("gpt2-gelu_new")
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    report = convert(tmp_path / "src", tmp_path / "out", ConversionOptions(calibration_tokens=32, seq_len=16, greedy_tokens=4,
                                                                        max_shard_bytes=20_000))
    assert report.passed, report.failures
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "out" / s).stat().st_size <= 20_000 + 4096 for s in shards)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert any(n.endswith("mlp.act.a") for n in index["weight_map"])


def test_invalid_options():
    with pytest.raises(ConversionError) as caught:
        ConversionOptions(dtype="float16")
    assert caught.value.code == "invalid_options"
    with pytest.raises(ConversionError):
        ConversionOptions(tolerance=0)
    with pytest.raises(ConversionError):
        ConversionOptions(checks=["everything"])


def test_output_directory_not_empty(source_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError) as caught:
        convert(source_dirs("gpt2-gelu_new"), out, ConversionOptions(checks=[]))
    assert caught.value.code == "invalid_options"
    assert (out / "keep.txt").read_text() == "mine"


def test_cancellation_leaves_nothing(source_dirs, tmp_path):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(ConversionError) as caught:
        convert(source_dirs("gpt2-gelu_new"), tmp_path / "out", ConversionOptions(checks=[]), should_cancel=should_cancel)
    assert caught.value.code == "cancelled"
    assert list(tmp_path.iterdir()) == []
