"""The device a conversion computes on (ConversionOptions.device, shared/conversion/device.py):
every pass's offload hooks, every site evaluation and every forward pass get it from the options,
and a device the machine lacks is refused before any work, with the options' error code.

This machine has no GPU. Besides "cpu" and None (which resolves to cpu here), the resolved device
is made torch.device("cpu", 0), which compares unequal to torch.device("cpu"): each place where a
device becomes real (accelerate's offload hooks, a site's module and head tensors, a pass's
inputs, the explicit heads) records what it was handed, then computes on the CPU (accelerate's
tied-weight bookkeeping takes "cpu:0" for another device but shares the CPU tensor). A place that
ignored the option and took the CPU would record cpu."""
import importlib

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook

from shared.conversion import ConversionOptions, check, checks, convert, device, explicit_convert, host, sitework
from shared.conversion.errors import InvalidOptionsError

from .tiny import build, save

convert_module = importlib.import_module("shared.conversion.convert")  # the package's `convert` is the function

MARKER = torch.device("cpu", 0)
SMALL = dict(calibration_tokens=64, seq_len=16, greedy_tokens=4)


class Seen:
    """The devices each place was handed, recorded through the module attributes it is reached by;
    each then runs on `run_on` (the CPU), or on what it was handed when run_on is None."""

    def __init__(self, monkeypatch, run_on=None):
        self.offload, self.hooks, self.sites, self.runs, self.explicit = [], [], [], [], []
        real_offload, real_set, real_run = host.offload, sitework.set_module_tensor_to_device, checks.run
        real_load_site = explicit_convert.load_site

        def offload(model, weights, device):
            self.offload.append(device)
            model = real_offload(model, weights, run_on or device)
            self.hooks += [h.execution_device for m in model.modules() for h in _hooks(m)
                           if h.execution_device is not None]
            return model

        def set_tensor(module, name, device, *args, **kwargs):
            self.sites.append(device)
            return real_set(module, name, run_on or device, *args, **kwargs)

        def run(*args, device=None, **kwargs):
            self.runs.append(device)
            return real_run(*args, device=run_on or device, **kwargs)

        def load_site(out_dir, site, plan, dtype, device="cpu"):
            self.explicit.append(device)
            return real_load_site(out_dir, site, plan, dtype, run_on or device)

        monkeypatch.setattr(host, "offload", offload)
        monkeypatch.setattr(sitework, "set_module_tensor_to_device", set_tensor)
        monkeypatch.setattr(checks, "run", run)
        monkeypatch.setattr(explicit_convert, "load_site", load_site)


def _hooks(module):
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook] if hook is not None else []
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _resolve_to(monkeypatch, target):
    """convert()/check() resolve the options' device through device.resolve: make it answer target."""
    monkeypatch.setattr(convert_module, "resolve_device", lambda requested: target)


@pytest.mark.parametrize("model_type, requested", [("gpt2", "cpu"), ("llama", None), ("gpt2", "marker"),
                                                   ("llama", "marker")])
def test_every_pass_and_site_evaluation_runs_on_the_options_device(tmp_path, monkeypatch, model_type, requested):
    save(build(model_type, max_position_embeddings=32) if model_type == "llama" else build(model_type, n_positions=32),
         tmp_path / "src")
    expected = MARKER if requested == "marker" else torch.device("cpu")
    if requested == "marker":
        _resolve_to(monkeypatch, MARKER)
    seen = Seen(monkeypatch, run_on=torch.device("cpu") if requested == "marker" else None)
    report = convert(tmp_path / "src", tmp_path / "out",
                     ConversionOptions(device=None if requested == "marker" else requested, **SMALL))
    assert report.passed, report.failures
    assert report.options["device"] == str(expected)
    assert seen.offload == [expected, expected]  # the reference (calibration and checks), the converted model
    assert seen.hooks and set(seen.hooks) == {torch.device("cpu")}  # every module's hook: where offload sent it
    # calibration pass, reference check pass, converted pass; greedy runs generate() on the two offloaded models
    assert seen.runs == [expected] * 3
    assert seen.sites and set(seen.sites) == {expected}  # every site module and head tensor loaded for a site

    seen.offload.clear(), seen.sites.clear(), seen.runs.clear()
    rechecked = check(tmp_path / "out", tmp_path / "src", ConversionOptions(
        device=None if requested == "marker" else requested, **SMALL))
    assert rechecked.passed and rechecked.options["device"] == str(expected)
    assert seen.offload == [expected, expected] and seen.runs == [expected] * 2
    assert seen.sites and set(seen.sites) == {expected}


def test_the_explicit_form_is_checked_on_the_options_device(tmp_path, monkeypatch):
    save(build("gpt2", activation_function="silu", n_positions=16), tmp_path / "src")
    _resolve_to(monkeypatch, MARKER)
    seen = Seen(monkeypatch, run_on=torch.device("cpu"))
    report = convert(tmp_path / "src", tmp_path / "out", ConversionOptions(
        dtype="float64", construction="explicit", checks=["local", "propagated"], **SMALL))
    assert report.passed, report.failures
    assert seen.offload == [MARKER] * 3  # the reference, the explicit model, the compact form against it
    assert seen.runs == [MARKER] * 4
    assert seen.explicit and set(seen.explicit) == {MARKER}  # the explicit heads' local check


def test_unset_device_resolves_to_cuda_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert device.resolve(None) == torch.device("cuda", 1)  # with its index: tensors report theirs
    assert device.resolve("cuda") == torch.device("cuda", 1)
    assert device.resolve("cuda:0") == torch.device("cuda", 0)
    assert device.resolve("cpu") == torch.device("cpu")
    with pytest.raises(InvalidOptionsError, match=r"2 CUDA device\(s\): cuda:0 to cuda:1") as refused:
        device.resolve("cuda:2")
    assert refused.value.code == "invalid_options"


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x", "CUDA", ""])
def test_a_device_name_other_than_cpu_or_cuda_is_an_option_error(name):
    with pytest.raises(InvalidOptionsError, match="device must be cpu, cuda or cuda:N") as refused:
        ConversionOptions(device=name)
    assert refused.value.code == "invalid_options"
    with pytest.raises(InvalidOptionsError, match="device must be cpu, cuda or cuda:N"):
        device.resolve(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_fails_before_any_work(tmp_path, monkeypatch):
    save(build("gpt2", n_positions=32), tmp_path / "src")

    def no_work(*args, **kwargs):
        raise AssertionError("the conversion started before it checked the device")

    monkeypatch.setattr(host, "load_config", no_work)
    for run in (lambda: convert(tmp_path / "src", tmp_path / "out", ConversionOptions(device="cuda")),
                lambda: check(tmp_path / "src", tmp_path / "src", ConversionOptions(device="cuda:0"))):
        with pytest.raises(InvalidOptionsError, match="torch sees no CUDA device") as refused:
            run()
        assert refused.value.code == "invalid_options"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging directory


def test_offload_hooks_execute_every_module_on_the_given_device(tmp_path):
    """host.offload itself: each module's hook (and each module kept loaded) is on the device asked."""
    from shared.conversion.checkpoint import SourceCheckpoint, storage_dtype
    from shared.conversion.weights import source_weights

    save(build("gpt2", n_positions=32), tmp_path / "src")
    config = host.load_config(tmp_path / "src")
    cls = host.model_class(config)
    model = host.build_empty(cls, config, torch.float32)
    checkpoint = SourceCheckpoint(tmp_path / "src")
    weights, _ = source_weights(model, checkpoint, cls, storage_dtype(checkpoint))
    model = host.offload(model, weights, MARKER)  # no forward: only where the hooks will compute
    hooks = [h.execution_device for m in model.modules() for h in _hooks(m) if h.execution_device is not None]
    assert len(hooks) > 5 and set(hooks) == {MARKER}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_convert_hands_its_device_to_the_options(tmp_path, capsys):
    from shared.conversion.cli import EXIT_USAGE, main

    save(build("gpt2", n_positions=32), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--device", "cuda"]) == EXIT_USAGE
    assert "[invalid_options]" in capsys.readouterr().err and not (tmp_path / "out").exists()
