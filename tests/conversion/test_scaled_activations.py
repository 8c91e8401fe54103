"""Real checkpoints carry huge activations: residuals around 2e4, FFN pre-activations of ±50.
Scale tiny models' weights until they do, and the targets must still hold, with Ω following
the calibration (never a fixed constant)."""
import json

import pytest
import torch

from shared.conversion import convert, load_converted

from .conftest import build_model, save_model


def ffn_pre_activation_max(model, name, tokens):
    """max |pre-activation| over all FFNs, seen through hooks on transformers' modules."""
    seen = []
    if name.startswith("gpt2"):
        modules = [block.mlp.c_fc for block in model.transformer.h]
    else:
        modules = [layer.mlp.gate_proj for layer in model.model.layers]
    handles = [m.register_forward_hook(lambda m, a, out: seen.append(out.abs().max().item())) for m in modules]
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    return max(seen), max(h.abs().max().item() for h in hidden[:-1])


def scaled_model(name, tokens):
    model = build_model(name)
    with torch.no_grad():
        if name.startswith("gpt2"):
            model.transformer.wte.weight.mul_(2e4 / model.transformer.wte.weight.abs().max())
            model.transformer.wpe.weight.mul_(2e4 / model.transformer.wpe.weight.abs().max())
            ffn_inputs = [b.mlp.c_fc for b in model.transformer.h]
        else:
            model.model.embed_tokens.weight.mul_(2e4 / model.model.embed_tokens.weight.abs().max())
            ffn_inputs = [layer.mlp.gate_proj for layer in model.model.layers]
        pre_max, _ = ffn_pre_activation_max(model, name, tokens)
        for linear in ffn_inputs:
            linear.weight.mul_(60 / pre_max)
            if getattr(linear, "bias", None) is not None:
                linear.bias.mul_(60 / pre_max)
    return model


@pytest.mark.parametrize("name,local_limit", [("gpt2-gelu_new", 1e-5), ("llama-gqa", 1e-4)])
def test_huge_activations_meet_targets(name, local_limit, tmp_path, fast_options):
    tokens = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    model = scaled_model(name, tokens)
    pre_max, residual_max = ffn_pre_activation_max(model, name, tokens)
    assert 50 <= pre_max <= 70 and residual_max >= 1e4, (pre_max, residual_max)
    source = save_model(model, tmp_path / "src")

    report = convert(source, tmp_path / "out", fast_options(calibration_tokens=256, seq_len=32))
    for entry in report.local:
        assert entry["ffn_rel"] <= local_limit, entry
    logits = report.propagated["logits"]
    assert logits["max_rel"] <= 1e-4 and logits["top1_agreement"] == 1.0
    if name.startswith("llama"):
        assert logits["kl_max"] <= 1e-6 and report.greedy["identical"]

    converted = load_converted(tmp_path / "out", device="cpu")
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
    assert (converted(tokens).logits - ref).abs().max() <= 1e-4 * ref.abs().max()

    # Ω follows the calibrated range: the scaled model's first FFN needs a larger Ω than the original's
    plain = save_model(build_model(name), tmp_path / "plain")
    convert(plain, tmp_path / "plain-out", fast_options(checks=[]))
    omega = lambda d: json.loads((d / "config.json").read_text())["attention_only"]["sites"][0]["omega"]
    assert omega(tmp_path / "out") > omega(tmp_path / "plain-out") + 20
