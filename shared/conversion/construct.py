"""Calibration statistics of one FFN -> its heads: the plan recorded in config.json and the
head tensors (a, c, g per head; eps per product pair), float32 (docs/DESIGN.md §2, §4).

The error budget is split in shares of the tolerance. When the measured error of a site is
still too large, calibrate.py asks again with smaller shares (`Budget.tighter`): more heads
per unit, larger Omega, smaller eps.
"""
import math
from dataclasses import dataclass, replace

import torch

from .activations import mixture_for
from .patterns import Experts, Gated, Site

# Calibration sees a few hundred tokens; real inputs go further. Ranges are widened by
# this factor before they set fit ranges, Omega and product gains.
RANGE_MARGIN = 1.5
# Omega is set for keys up to this many times the (widened) calibrated range: an input beyond the
# range that Omega covers makes its key outweigh every self bias (with ReLU's gain of ~1e4 this
# happens within a hair of the range). The fast path factors e^Omega out exactly, so a large Omega
# costs no precision there.
OMEGA_RANGE = 4.0
# Omega puts the other keys' summed weight at most e^-LEAK_EXPONENT of the self and null slots'
# (for keys in the range above): below rounding in float32 and float64, so leakage spends none of
# the tolerance, and the fast path may evaluate such heads from the self and null slots alone
# (fastpath.NEGLIGIBLE_LEAK = -60, checked per column at run time).
LEAK_EXPONENT = 64.0
HEAD_DTYPE = torch.float32  # head parameters are stored in float32 whatever the source dtype


@dataclass(frozen=True)
class Budget:
    """Shares of the tolerance spent on each construction error (leakage spends none: see
    LEAK_EXPONENT); the rest is rounding."""
    fit: float = 0.25
    product: float = 0.1
    max_heads: int = 16  # per unit; below what the fit share asks for, the best fit with at most this many

    def tighter(self) -> "Budget":
        return replace(self, fit=self.fit / 8, product=self.product / 8)

    def fewer_heads(self, heads: int) -> "Budget":
        """At most heads - 1 heads per unit, whatever the fit share asks: the closed loop's step down."""
        return replace(self, max_heads=heads - 1)


@dataclass
class SiteStats:
    """Max |.| over calibration tokens. Plain: the pre-activation u. Gated: the gate
    pre-activation, and per unit max |act(gate)| (F,). Experts: the same per expert (E,), (E, F)."""
    pre_abs: torch.Tensor  # () or (E,)
    gate_out_abs: torch.Tensor | None = None  # (F,) or (E, F)


def leak_omega(max_key: float, context: int) -> float:
    """Omega such that n visible keys with scores up to max_key leak at most e^-LEAK_EXPONENT:
    leak weight <= n exp(max_key - Omega) (docs/DESIGN.md §2, 'Choosing Omega')."""
    return max(max_key, 0.0) + math.log(context) + LEAK_EXPONENT


def plan_site(site: Site, stats: SiteStats, tolerance: float, context: int, budget: Budget) -> tuple[dict, dict]:
    """(plan for config.json, {tensor name relative to the head module: tensor})."""
    input_range = RANGE_MARGIN * float(stats.pre_abs.max())
    mixture = mixture_for(site.activation, input_range, budget.fit * tolerance, budget.max_heads)
    max_key = max(abs(a) * input_range + abs(c) for a, c in zip(mixture.a, mixture.c))
    plan = {
        "path": site.path, "kind": site.pattern.kind, "activation": site.activation, "causal": site.causal,
        "units": site.units, "heads_per_unit": mixture.heads, "heads": site.units * mixture.heads,
        "omega": leak_omega(OMEGA_RANGE * max_key, context), "input_range": input_range,
        "fit_max_abs_error": mixture.max_abs_error,
    }
    # one mixture serves every unit of a site: (M, 1) each, broadcast over the F units
    abc = {name: torch.tensor(values, dtype=torch.float64)[:, None].to(HEAD_DTYPE)
           for name, values in (("a", mixture.a), ("c", mixture.c), ("g", mixture.g))}
    squared = site.activation == "relu2"
    if not isinstance(site.pattern, (Gated, Experts)) and not squared:
        return plan, abc
    # product pairs: (2/eps) tanh(eps s / 2) = s (1 - eps^2 s^2 / 12 + ...), per unit
    # one eps per site, experts included: a unit (or a whole expert) that calibration saw barely
    # active, or never routed to, may fire on other text, and eps set from its own small range
    # would then cost (eps s)^2 / 12 in full (an unseen expert's eps would be ~1e3 and its
    # products garbage). A smaller eps only makes the pairs more exact.
    s_max = stats.gate_out_abs.double().max()
    s_range = (RANGE_MARGIN * s_max).clamp_min(1e-6).expand_as(stats.gate_out_abs)  # (F,) or (E, F)
    eps = math.sqrt(12 * budget.product * tolerance) / s_range
    plan.update(heads=plan["heads"] + 2 * site.units, eps_min=float(eps.min()), eps_max=float(eps.max()),
                product_omega=leak_omega(OMEGA_RANGE * float((eps * s_range).max()), context))
    if isinstance(site.pattern, Gated) or squared:
        return plan, {**{f"gate_heads.{k}": v for k, v in abc.items()}, "product.eps": eps.to(HEAD_DTYPE)}
    experts = eps.shape[0]
    plan["heads"] *= experts
    per_expert = {k: v[None].expand(experts, -1, -1).contiguous() for k, v in abc.items()}  # (E, M, 1)
    return plan, {**per_expert, "eps": eps.to(HEAD_DTYPE)}
