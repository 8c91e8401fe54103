"""The explicit construction (docs/DESIGN.md §8): literal Q/K/V/O heads over a widened residual,
against transformers and against the compact form; its size guard; `attnonly explain`."""
import math
import re

import pytest
import torch
import transformers
from safetensors import safe_open

from shared.conversion import ConversionOptions, convert
from shared.conversion.errors import ExplicitTooLargeError, InvalidOptionsError, UnsupportedArchitectureError

from .tiny import build, save

F64 = dict(dtype="float64", construction="explicit", calibration_tokens=64, seq_len=16, greedy_tokens=8)


def _convert(tmp_path_factory, name, options, **model):
    root = tmp_path_factory.mktemp(name)
    save(build(**model), root / "src")
    return root, convert(root / "src", root / "out", ConversionOptions(**options))


@pytest.fixture(scope="module")
def gpt2_silu(tmp_path_factory):
    return _convert(tmp_path_factory, "gpt2-silu", F64, model_type="gpt2", activation_function="silu", n_positions=32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _convert(tmp_path_factory, "llama", F64, model_type="llama", max_position_embeddings=32)


def _per_layer_against_transformers(root, tokens: torch.Tensor) -> list[float]:
    """Relative error of every hidden state of the explicit model against transformers' own, float64."""
    from shared.conversion import load_converted

    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float64).eval()
    ours = load_converted(root / "out")
    with torch.no_grad():
        a = ours(tokens, output_hidden_states=True, use_cache=False)
        b = reference(tokens, output_hidden_states=True, use_cache=False)
    errors = [float((x - y).abs().max() / y.abs().max()) for x, y in zip(a.hidden_states, b.hidden_states)]
    return errors + [float((a.logits - b.logits).abs().max() / b.logits.abs().max())]


@pytest.mark.parametrize("which", ["gpt2_silu", "llama"])
def test_explicit_float64_reaches_1e_10_per_layer(which, request):
    root, report = request.getfixturevalue(which)
    assert report.passed, report.failures
    assert report.config["attention_only"]["construction"] == "explicit"
    assert all(entry["ffn_rel"] <= 1e-10 for entry in report.local), report.local
    assert all(entry["residual_rel"] <= 1e-10 for entry in report.propagated["residual"])
    versus = report.propagated["explicit_vs_compact"]
    assert len(versus) == len(report.propagated["residual"]) + 1 and all(r["max_rel"] <= 1e-10 for r in versus)
    assert report.greedy["identical"]  # generate() through the explicit heads' decoding state
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    errors = _per_layer_against_transformers(root, tokens)
    assert max(errors) <= 1e-10, errors


def test_explicit_checkpoint_holds_literal_matrices(gpt2_silu):
    from shared.conversion import load_converted
    from shared.conversion.explicit import ExplicitFFN
    from shared.conversion.modules import NeuronHeads

    root, report = gpt2_silu
    site = report.config["attention_only"]["sites"][0]
    entry = site["explicit"]
    # 32 tokens + the bias token; widened residual x (32) + positions (33) + constant; a neuron head per
    # unit (GPT-2's 4 x 32) + the bias head
    assert (entry["positions"], entry["width"], entry["head_dim"], entry["heads"]) == (33, 66, 34, [129])
    with safe_open(root / "out" / "model.safetensors", "pt") as f:
        q = f.get_tensor("transformer.h.0.mlp.explicit.layers.0.q")
        o = f.get_tensor("transformer.h.0.mlp.explicit.layers.0.o")
        w_up = f.get_tensor("transformer.h.0.mlp.c_fc.weight")  # the compact form's tensors stay
    assert q.shape == (129, 66, 34) and o.shape == (129, 34, 66) and q.dtype == torch.float64
    assert torch.equal(q[5, :32, 33], w_up[:, 5].double())  # unit 5's query reads u_5 = w_5 . x (a = 1)
    assert torch.all(q[5, 32 + torch.arange(1, 33), torch.arange(1, 33)] == entry["omega"])  # position channels 32..64
    assert torch.all(q[5, 65, 1:33] == -entry["omega"]) and q[5, 65, 0] == 0  # the constant channel
    model = load_converted(root / "out")
    kinds = {type(m) for m in model.modules()}
    assert ExplicitFFN in kinds and NeuronHeads not in kinds
    assert NeuronHeads in {type(m) for m in load_converted(root / "out", construction="compact").modules()}


def test_size_guard_refuses_before_calibrating(tmp_path, monkeypatch):
    import importlib

    convert_module = importlib.import_module("shared.conversion.convert")  # the module, not the function
    save(build("gpt2", activation_function="silu"), tmp_path / "src")  # n_positions 128
    monkeypatch.setattr(convert_module, "Calibrator", lambda *a, **k: pytest.fail("calibrated before the guard"))
    with pytest.raises(ExplicitTooLargeError) as caught:
        convert(tmp_path / "src", tmp_path / "out",
                ConversionOptions(construction="explicit", explicit_max_params=1_000_000))
    # per site: width 32 + 129 + 1 = 162, head dimension 130, 128 neuron heads + 1 bias head, 4 matrices
    size = 2 * 4 * 162 * 130 * 129
    assert caught.value.code == "explicit_too_large"
    assert f"{size:,}" in caught.value.message and "1,000,000" in caught.value.message
    assert not (tmp_path / "out").exists()


def test_gelu_goes_through_the_compact_fits(tmp_path):
    save(build("gpt2", activation_function="gelu_new", n_positions=32), tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", ConversionOptions(
        construction="explicit", calibration_tokens=64, seq_len=16, greedy_tokens=8))
    assert report.passed, report.failures
    assert all(site["heads_per_unit"] > 1 for site in report.config["attention_only"]["sites"])
    assert all(r["max_rel"] <= 1e-5 for r in report.propagated["explicit_vs_compact"])


def test_mixture_of_experts_is_refused(tmp_path):
    save(build("mixtral", max_position_embeddings=32), tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError, match="no explicit form"):
        convert(tmp_path / "src", tmp_path / "out", ConversionOptions(construction="explicit"))


def test_options_accept_the_two_constructions():
    from shared.job_options import JobOptions

    with pytest.raises(InvalidOptionsError):
        ConversionOptions(construction="factored")
    assert JobOptions(construction="explicit").to_conversion_kwargs()["construction"] == "explicit"


ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")


def test_explain_prints_sigma_of_u_on_self_and_writes_the_figure(gpt2_silu, tmp_path, capsys):
    from shared.conversion.cli import main

    root, _ = gpt2_silu
    tokens = [3, 14, 15, 92, 65, 35]
    figure = tmp_path / "unit.svg"
    assert main(["explain", str(root / "out"), "--layer", "1", "--unit", "5", "--prompt-ids",
                 ",".join(map(str, tokens)), "--figure", str(figure)]) == 0
    text = capsys.readouterr().out
    assert "W_Q (66 x 34)" in text and "W_O (34 x 66)" in text
    rows = [ROW.match(line) for line in text.splitlines()]
    rows = [tuple(float(v) for v in m.groups()[1:]) for m in rows if m]
    # u of unit 5 in layer 1 from transformers' own GPT-2: the input of c_fc, through its weights
    source = transformers.AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float64).eval()
    seen = []
    source.transformer.h[1].mlp.c_fc.register_forward_hook(lambda m, args, out: seen.append(out[0, :, 5]))
    with torch.no_grad():
        source(torch.tensor([tokens]))
    assert len(rows) == len(tokens)
    for (score, self_weight, _, bias_weight), u in zip(rows, seen[0].tolist()):
        assert abs(score - u) <= 1e-12
        assert abs(self_weight - 1 / (1 + math.exp(-u))) <= 1e-12
        assert abs(self_weight + bias_weight - 1) <= 1e-12  # nothing on any other position
    assert figure.stat().st_size > 10_000 and "<svg" in figure.read_text()


def test_convert_explain_adds_the_unit_to_report_html(gpt2_silu):
    from shared.conversion.explain_cli import add_to_report

    root, _ = gpt2_silu
    page = add_to_report(root / "out", [(0, 2)])
    html = page.read_text()
    assert "Unit 2 of layer 0, in both forms" in html and html.count("<svg") >= 2


def test_convert_command_takes_the_construction_and_units_to_explain():
    from shared.conversion.cli import build_parser

    args = build_parser("attnonly").parse_args(["convert", "src", "out", "--construction", "explicit",
                                                "--explain", "1:5", "--explain", "0:2"])
    assert (args.construction, args.explain, args.explicit_max_params) == ("explicit", [(1, 5), (0, 2)], 50_000_000)
    with pytest.raises(SystemExit):
        build_parser("attnonly").parse_args(["convert", "src", "out", "--explain", "five"])
