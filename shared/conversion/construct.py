"""Source description + calibration statistics -> the attention-only description.

For every layer: the sublayer list for config.json (kinds, head counts, Ω, widths) and the
extra tensors the heads need (a, c, g per head; eps per product pair). The source weights
themselves pass through unchanged (factored form, DESIGN.md §2).
"""
import math

import torch

from .activations import mixture_for

# Calibration sees a few hundred tokens; real inputs go further. Ranges are widened by
# this factor before they set fit ranges, Ω and product gains.
RANGE_MARGIN = 1.5
# Share of the tolerance spent on each construction error (fit, leakage, product Taylor term):
# the rest is left to floating-point rounding.
FIT_SHARE, LEAK_SHARE, PRODUCT_SHARE = 0.25, 0.01, 0.1
# Post-norm blocks (BERT) normalise right after adding the FFN output, which magnifies its
# error relative to the block output (by ~10x, measured on all-MiniLM-L6-v2): fit tighter.
POST_NORM_FIT_SHARE = 0.025


def leak_omega(max_key: float, context: int, tolerance: float) -> float:
    """Ω such that n visible keys with scores up to max_key leak < LEAK_SHARE * tolerance:
    leak weight <= n * exp(max_key - Ω) (DESIGN.md §2, 'Choosing Ω')."""
    return max(max_key, 0.0) + math.log(context / (LEAK_SHARE * tolerance))


def plan_layer(arch: dict, stats, tolerance: float, dtype: torch.dtype):
    """(sublayer specs, {runtime tensor name suffix: tensor}) for one layer."""
    D, F, context = arch["d_model"], arch["ffn"]["width"], arch["max_positions"]
    activation = arch["ffn"]["activation"]
    att = arch["attention"]
    attention = {"kind": "attention", "heads": att["n_heads"], "kv_heads": att["n_kv_heads"],
                 "head_dim": att["head_dim"], "width": D}
    input_range = RANGE_MARGIN * stats.pre_activation_abs
    fit_share = POST_NORM_FIT_SHARE if arch["placement"] == "post" else FIT_SHARE
    mixture = mixture_for(activation, input_range, fit_share * tolerance)
    max_key = max(abs(a) * input_range + abs(c) for a, c in zip(mixture.a, mixture.c))
    neuron = {
        "activation": activation, "units": F, "heads_per_unit": mixture.heads, "heads": F * mixture.heads,
        "omega": leak_omega(max_key, context, tolerance), "input_range": input_range,
        "fit_range": mixture.fit_range if math.isfinite(mixture.fit_range) else None,
        "fit_max_abs_error": mixture.max_abs_error, "width": D,
    }
    head_tensors = mixture_tensors(mixture, F, dtype)
    if arch["ffn"]["kind"] == "plain":
        return [attention, {"kind": "neuron", **neuron}], {f"ffn.heads.{k}": v for k, v in head_tensors.items()}

    gate = {"kind": "gate", **neuron, "scratch_channels": [D, D + F]}
    # product pair error: (2/eps) tanh(eps s / 2) = s (1 - eps^2 s^2 / 12 + ...), per unit
    s_range = (RANGE_MARGIN * stats.gate_output_abs).clamp_min(1e-6)  # (F,)
    eps = torch.sqrt(torch.tensor(12 * PRODUCT_SHARE * tolerance, dtype=torch.float64)) / s_range.double()
    max_product_key = (eps * s_range.double()).max().item()
    product = {
        "kind": "product", "units": F, "heads": 3 * F, "pair_heads": 2 * F, "identity_heads": F,
        "omega": leak_omega(max_product_key, context, tolerance),
        "identity_omega": leak_omega(0.0, context, tolerance),
        "eps_min": eps.min().item(), "eps_max": eps.max().item(), "width": D,
    }
    tensors = {f"gate.heads.{k}": v for k, v in head_tensors.items()}
    tensors["product.eps"] = eps.to(dtype)
    tensors["product.clear.a"] = torch.zeros(1, F, dtype=dtype)
    tensors["product.clear.c"] = torch.zeros(1, F, dtype=dtype)
    tensors["product.clear.g"] = torch.full((1, F), -1.0, dtype=dtype)
    return [attention, gate, product], tensors


def mixture_tensors(mixture, units: int, dtype) -> dict:
    """a, c, g as (M, F): the same fitted terms for every unit of the layer."""
    return {name: torch.tensor(values, dtype=torch.float64)[:, None].expand(-1, units).to(dtype).contiguous()
            for name, values in (("a", mixture.a), ("c", mixture.c), ("g", mixture.g))}
