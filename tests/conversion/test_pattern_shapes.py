"""The registry's shape rules on models built on the meta device (no weights, no conversion):
which row matches, with which width, and the activation slots a model gets of its own."""
import pytest
import torch
import torch.nn as nn
import transformers

from shared.conversion import host
from shared.conversion.errors import UnsupportedArchitectureError
from shared.conversion.patterns import Experts, Gated, Plain, find_sites

from .tiny import tiny_config


def sites_of(model_type: str, **overrides):
    config = tiny_config(model_type, **overrides)
    cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    return host.build_empty(cls, config, torch.float32), find_sites(
        host.build_empty(cls, config, torch.float32), causal=True, encoder_decoder=False)


def test_a_projection_twice_as_wide_as_the_down_input_is_a_fused_gate():
    """moshi's fc1 is (2F, D) and fc2 (D, F): the plain fc1/fc2 row must not take it."""
    _, sites = sites_of("moshi", ffn_dim=64)
    assert sites and all(isinstance(s.pattern, Gated) and s.pattern.fused == "fc1" for s in sites)
    assert {s.units for s in sites} == {32}


def test_plain_fc1_fc2_stays_plain():
    _, sites = sites_of("opt")
    assert sites and all(isinstance(s.pattern, Plain) and s.pattern.up == "fc1" for s in sites)


def test_function_and_shared_activations_become_modules_of_each_model():
    """openai-gpt keeps gelu as a function and a module-level nn.ReLU shared by every layer and
    every model: each site of each build gets its own activation module."""
    for afn, expected in (("gelu", "gelu_tanh"), ("relu", "relu")):
        first, sites = sites_of("openai-gpt", afn=afn)
        second, _ = sites_of("openai-gpt", afn=afn)
        acts = [first.get_submodule(s.join(s.pattern.act)) for s in sites]
        assert len(sites) == 2 and {s.activation for s in sites} == {expected}
        assert len({id(a) for a in acts}) == len(acts)
        assert not {id(a) for a in acts} & {id(second.get_submodule(s.join(s.pattern.act))) for s in sites}


def test_called_activation_computes_the_function():
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(host.CalledActivation(nn.functional.relu)(x), nn.functional.relu(x))


def test_gated_site_without_down_projection():
    """cpmant: w_in computes act(w_0 x) * w_1 x; its parent's w_out is the down projection."""
    _, sites = sites_of("cpmant", dim_ff=64, dim_head=8)
    assert sites and all(isinstance(s.pattern, Gated) and s.pattern.down is None and s.path.endswith("w_in")
                         for s in sites)


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_layouts(transposed):
    E, F, D = 3, 5, 7
    row = Experts(transposed=transposed)
    gate_up, down = torch.empty(E, 2 * F, D), torch.empty(E, D, F)
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    assert row.shapes(gate_up, down) == (E, F, D)
    assert Experts(transposed=not transposed).shapes(gate_up, down) is None
    assert row.shapes(torch.cat((gate_up, gate_up[:1])), down) is None  # extra rows: identity experts


def test_zero_compute_experts_are_refused_by_name():
    """longcat_flash's gate_up has rows for identity experts that down_proj lacks."""
    with pytest.raises(UnsupportedArchitectureError, match="LongcatFlashExperts"):
        sites_of("longcat_flash", expert_ffn_hidden_size=32, zero_expert_num=2, q_lora_rank=16, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, num_key_value_heads=4)
