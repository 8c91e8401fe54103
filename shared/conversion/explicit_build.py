"""The explicit form of a conversion (explicit.py has the math): its size and the size guard, its
matrices from the source's projections and the compact plan, and its hosting in the source's class.

Tensors, per site: `<site>.explicit.layers.<i>.q|k|v` (H_i, W, P + 1) and `.o` (H_i, P + 1, W), in
the compute dtype (their entries are products such as (2/eps) W_down that float32 storage would
round). Layer 0 holds the neuron heads (plain FFNs) or the gate heads (gated, squared ReLU); layer 1
the product pairs; the last layer also the bias head when the down projection has a bias.
"""
import torch
import torch.nn as nn

from .activations import exact_activation
from .errors import ExplicitTooLargeError, InvalidConvertedCheckpointError, UnsupportedArchitectureError
from .explicit import (EXTRA_OMEGA, ExplicitFFN, ExplicitHost, Layout, _Forward, bias_rows, cat_rows, head_matrices,
                       neuron_rows)
from .patterns import Experts, Gated, Plain, Site

# Product pairs, two per unit: keys +-eps s and +-2 eps s, output gains (over 1/eps) such that the
# sum is (4 T(eps) - T(2 eps)) / 3 with T(e) = (2/e) u tanh(e s / 2) = s u (1 - (e s)^2 / 12 + ...):
# Richardson's combination cancels the (e s)^2 term, leaving s u (1 - (eps s)^4 / 30 + ...).
PAIR_KEYS = (1.0, -1.0, 2.0, -2.0)
PAIR_GAINS = (8 / 3, -8 / 3, -1 / 3, 1 / 3)


def _set(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _projection(site: Site) -> tuple[str, str]:
    """(the projection whose input is the FFN's input, the down projection), relative to the site."""
    p = site.pattern
    if isinstance(p, Plain):
        return p.up, p.down
    return (p.fused or p.gate), p.down


def in_features(module: nn.Module) -> int:
    if hasattr(module, "nx"):  # transformers' Conv1D: weight (in, out)
        return int(module.nx)
    return int(getattr(module, "in_features", None) or module.weight.shape[1])


def affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)) of a Linear-like module, float64; a missing bias is zeros."""
    weight = module.weight.detach().double()
    weight = weight.T if hasattr(module, "nf") else weight  # Conv1D stores (in, out)
    bias = getattr(module, "bias", None)
    return weight, (bias.detach().double() if isinstance(bias, torch.Tensor) else weight.new_zeros(weight.shape[0]))


def _two_layers(site: Site) -> bool:
    return isinstance(site.pattern, Gated) or site.activation == "relu2"


def site_layout(model: nn.Module, site: Site, tokens: int) -> tuple[Layout, bool]:
    """The site's widened residual for sequences up to `tokens`, and whether its down projection has a bias."""
    if isinstance(site.pattern, Experts):
        raise UnsupportedArchitectureError(
            f"{site.path}: mixture-of-experts sites have no explicit form (routed tokens carry no sequence "
            "order for position channels to address); convert with construction 'compact'")
    if not site.pattern.down:
        raise UnsupportedArchitectureError(
            f"{site.path}: a gated FFN without a down projection has no explicit form here")
    first, down = _projection(site)
    module = model.get_submodule(site.path)
    d_model = in_features(module.get_submodule(first))
    has_bias = isinstance(getattr(module.get_submodule(down), "bias", None), torch.Tensor)
    return Layout(d_model, site.units if _two_layers(site) else 0, tokens + 1), has_bias


def heads_per_layer(site: Site, heads_per_unit: int, has_bias: bool) -> list[int]:
    if _two_layers(site):
        return [heads_per_unit * site.units, 2 * len(PAIR_KEYS) * site.units + int(has_bias)]
    return [heads_per_unit * site.units + int(has_bias)]


def params(layout: Layout, heads: list[int]) -> int:
    return 4 * layout.width * layout.head_dim * sum(heads)


def guard(model: nn.Module, sites: list[Site], tokens: int, limit: int, heads_per_unit=None) -> int:
    """The explicit form's parameter count (heads_per_unit: per site, from the plans; None: one
    head per unit, the least any activation needs); refuses it above `limit`."""
    total = 0
    for i, site in enumerate(sites):
        layout, has_bias = site_layout(model, site, tokens)
        total += params(layout, heads_per_layer(site, heads_per_unit[i] if heads_per_unit else 1, has_bias))
    if total > limit:
        raise ExplicitTooLargeError(
            f"the explicit form would have {total:,} parameters ({len(sites)} FFN sites, position channels for "
            f"{tokens} tokens), over the limit explicit_max_params = {limit:,}; use construction 'compact'")
    return total


def describe(layout: Layout, heads: list[int], omega: float) -> dict:
    """The plan's "explicit" entry."""
    return {"d_model": layout.d_model, "scratch": layout.scratch, "positions": layout.positions,
            "width": layout.width, "head_dim": layout.head_dim, "heads": heads, "omega": omega,
            "params": params(layout, heads)}


def layout_of(entry: dict) -> Layout:
    return Layout(entry["d_model"], entry["scratch"], entry["positions"])


def pair_eps(plan: dict, activation: str, dtype: torch.dtype) -> float:
    """The explicit product pairs' eps: eps s_max = (7.5 u)^(1/5) for the unit roundoff u of the
    compute dtype, which balances the pairs' x^4 / 30 (Richardson-combined) against the rounding of
    a softmax weight near 1/2, u / x, amplified by their gain 1/eps (docs/DESIGN.md §8). s_max
    bounds |act(gate)| over the plan's (widened) gate range."""
    grid = torch.linspace(-plan["input_range"], plan["input_range"], 4001, dtype=torch.float64)
    s_max = float(exact_activation("relu" if activation == "relu2" else activation, grid).abs().max())
    return (7.5 * torch.finfo(dtype).eps / 2) ** 0.2 / max(s_max, 1e-6)


def build_site(site: Site, plan: dict, tensors: dict, module: nn.Module, layout: Layout, has_bias: bool,
               dtype: torch.dtype):
    """(plan entry, [(q, k, v, o) per layer], float64) from the site's float64 FFN module (real
    weights) and its compact head tensors (a, c, g as stored) for the compute dtype."""
    p = site.pattern
    x = layout.blocks()["x"]
    mixture = {n: tensors[("gate_heads." if _two_layers(site) else "") + n].double()[:, 0] for n in "acg"}  # (M,)
    if isinstance(p, Plain):
        gate_w, gate_b = affine(module.get_submodule(p.up))
        up_w, up_b = gate_w, gate_b
    elif p.fused:
        w, b = affine(module.get_submodule(p.fused))
        (gate_w, up_w), (gate_b, up_b) = w.chunk(2), b.chunk(2)  # the gated half first
    else:
        (gate_w, gate_b), (up_w, up_b) = affine(module.get_submodule(p.gate)), affine(module.get_submodule(p.up))
    down_w, down_b = affine(module.get_submodule(p.down))  # (D, F), (D,)
    omega = max(plan["omega"], plan.get("product_omega", 0.0)) + EXTRA_OMEGA
    F = site.units
    if _two_layers(site):
        scratch = layout.blocks()["scratch"]
        gate = neuron_rows(layout, gate_w, gate_b, mixture["a"], mixture["c"], mixture["g"], gate_w, gate_b,
                           torch.eye(F, dtype=torch.float64), scratch, x)
        eps = torch.full((F,), pair_eps(plan, site.activation, dtype), dtype=torch.float64)
        keys, gains = (torch.tensor(t, dtype=torch.float64) for t in (PAIR_KEYS, PAIR_GAINS))
        product = neuron_rows(layout, torch.diag(eps), torch.zeros(F, dtype=torch.float64), keys,
                              torch.zeros_like(keys), gains, up_w, up_b, (1.0 / eps)[:, None] * down_w.T, x, scratch)
        layers = [gate, cat_rows([product] + ([bias_rows(layout, down_b)] if has_bias else []))]
    else:
        neurons = neuron_rows(layout, up_w, up_b, mixture["a"], mixture["c"], mixture["g"], up_w, up_b, down_w.T, x, x)
        layers = [cat_rows([neurons] + ([bias_rows(layout, down_b)] if has_bias else []))]
    entry = describe(layout, [int(rows.query.shape[0]) for rows in layers], omega)
    if _two_layers(site):
        entry["eps"] = float(eps[0])
    return entry, [head_matrices(layout, rows, omega) for rows in layers]


def tensor_names(site: Site, layers: int) -> list[list[str]]:
    return [[f"{site.join('explicit')}.layers.{i}.{m}" for m in "qkvo"] for i in range(layers)]


def swap_in(model: nn.Module, sites: list[Site], plans: list[dict], context) -> None:
    """Every site's FFN replaced by its ExplicitFFN at <site>.explicit, on the meta device."""
    for site, plan in zip(sites, plans):
        entry = plan.get("explicit")
        if entry is None:
            raise InvalidConvertedCheckpointError(f"{site.path} has no explicit form in config.json")
        with torch.device("meta"):
            dtype = getattr(model, "dtype", torch.float32)
            ffn = ExplicitFFN(layout_of(entry), entry["heads"], site.causal, context, dtype)
            if isinstance(site.pattern, Plain):
                model.get_submodule(site.path).add_module("explicit", ffn)
                _set(model, site.join(site.pattern.up), _Forward(ffn))
                _set(model, site.join(site.pattern.act), nn.Identity())
                _set(model, site.join(site.pattern.down), nn.Identity())
            else:
                _set(model, site.path, ExplicitHost(ffn))
