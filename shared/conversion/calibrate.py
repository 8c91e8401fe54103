"""Calibration and local checks: one forward pass of the source model (transformers' own class,
its weights loaded module by module), with a hook on every FFN site that works on the inputs
the site saw, one site at a time, while the pass goes on.

    Calibrator   per site: statistics, numerical verification of the pattern match, the plan,
                 and the closed loop: build the heads, measure the error against the source in
                 float64, re-size (Budget.tighter) until it is at most MARGIN x tolerance, or,
                 when the first plan already is, step the heads per unit down while it stays so
    LocalCheck   per site: the converted heads against the source in float64 on check tokens

Both evaluate on the device the pass runs on (the site's inputs are there); the statistics that
plan a site come back to the CPU, so plans and head tensors are made and stored there.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .construct import Budget, SiteStats, plan_site
from .modules import expert_projection
from .errors import UnsupportedArchitectureError
from .patterns import Experts, Plain, Site, candidate_activations, identify_activation, relative_error
from .sitework import SiteWork

VERIFY_TOLERANCE = 1e-6  # the pattern's reconstruction vs the module's own forward, float64
RESIZE_ATTEMPTS = 4
MARGIN = 0.25  # a site is accepted when its calibration error is at most MARGIN x tolerance: check
# tokens reach further than calibration tokens, and the verdict wants half the tolerance there


def hook_site(model: nn.Module, site: Site, on_inputs) -> torch.utils.hooks.RemovableHandle:
    """Call on_inputs(site, inputs) with what the site receives in model's forward passes."""
    if isinstance(site.pattern, Plain):
        target = model.get_submodule(site.join(site.pattern.act))
        return target.register_forward_pre_hook(lambda m, args: on_inputs(site, (args[0],)))

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(site.pattern, Experts):
            rest = list(args[1:3]) if len(args) >= 3 else [kwargs["top_k_index"], kwargs["top_k_weights"]]
            on_inputs(site, (x, *rest))
        else:  # the rest of the call, so that the reference is the module's forward as the model calls it
            on_inputs(site, (x, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    return model.get_submodule(site.path).register_forward_pre_hook(pre, with_kwargs=True)


def site_stats(site: Site, inputs, work: SiteWork) -> SiteStats:
    """Max |pre-activation| (and per unit |act(gate)| for gated sites), from the site's inputs;
    computed where the inputs are, returned on the CPU."""
    from .activations import exact_activation

    if isinstance(site.pattern, Plain):
        u = inputs[0].detach().double().reshape(-1, site.units)
        gate_out = torch.relu(u).amax(0).cpu() if site.activation == "relu2" else None  # (F,): the ReLU gate's range
        return SiteStats(u.abs().max().cpu(), gate_out)
    module = work._module(None, torch.float64)
    x = inputs[0].detach().double()
    p = site.pattern
    if isinstance(p, Experts):
        gate_up = getattr(module, p.gate_up)
        E, F = gate_up.shape[0], site.units
        pre = torch.zeros(E, dtype=torch.float64, device=x.device)
        out = torch.zeros(E, F, dtype=torch.float64, device=x.device)
        for e in inputs[1].unique().tolist():
            if 0 <= e < E:
                token = torch.where(inputs[1] == e)[0]
                gate = expert_projection(x[token], gate_up[e], p.transposed)[:, :F]
                pre[e], out[e] = gate.abs().max(), exact_activation(site.activation, gate).abs().amax(0)
        return SiteStats(pre.cpu(), out.cpu())
    gate = module.get_submodule(p.fused)(x).chunk(2, dim=-1)[0] if p.fused else module.get_submodule(p.gate)(x)
    gate = gate.reshape(-1, F := site.units)
    return SiteStats(gate.abs().max().cpu(), exact_activation(site.activation, gate).abs().amax(0).cpu())


@dataclass
class SiteResult:
    site: Site
    plan: dict
    tensors: dict
    calibration_rel: float
    adjustments: list = field(default_factory=list)


class Calibrator:
    """on_inputs for the calibration pass: everything a site needs before it can be written."""

    def __init__(self, probe, weights, tolerance: float, context: int, dtype: torch.dtype, device: torch.device,
                 progress=None):
        self.probe, self.weights, self.tolerance, self.context, self.dtype = probe, weights, tolerance, context, dtype
        self.device = device
        self.results: dict[str, SiteResult] = {}
        self.progress = progress or (lambda site: None)

    def __call__(self, site: Site, inputs) -> None:
        if site.path in self.results:
            raise UnsupportedArchitectureError(
                f"{site.path} ({site.pattern.kind} FFN) runs more than once in one forward pass (a block shared "
                "between layers); each run would need heads of its own")
        work = SiteWork(site, self.probe, self.weights, self.device)
        where = f"{site.path} ({site.pattern.kind} FFN, {site.activation})"
        if isinstance(site.pattern, Plain):  # the activation, on what it really sees
            act = self.probe.get_submodule(site.join(site.pattern.act))
            identify_activation(act, where, inputs[0][..., :64])
        reference = work.reference(inputs)
        for site.activation in candidate_activations(site):  # one, unless the module names none
            mismatch = relative_error(work.rebuilt(inputs), reference)
            if mismatch <= VERIFY_TOLERANCE:
                break
        if not mismatch <= VERIFY_TOLERANCE:
            raise UnsupportedArchitectureError(
                f"{where}: the module's own forward and the {site.pattern.kind} pattern's reconstruction differ by "
                f"{mismatch:.3g} (relative, float64; limit {VERIFY_TOLERANCE:g}); refusing to convert it")
        stats = site_stats(site, inputs, work)
        budget, adjustments = Budget(), []
        measure = _Measure(site, stats, work, inputs, reference, self)
        for attempt in range(RESIZE_ATTEMPTS + 1):
            plan, tensors, error = measure(budget)
            if error <= MARGIN * self.tolerance or attempt == RESIZE_ATTEMPTS:
                break
            adjustments.append(f"calibration error {error:.3g} > {MARGIN:g} x tolerance with {plan['heads_per_unit']} "
                               f"heads/unit, omega {plan['omega']:.4g}: tightened the budget")
            budget = budget.tighter()
        if not adjustments:
            plan, tensors, error = _fewer_heads(measure, budget, (plan, tensors, error), MARGIN * self.tolerance)
        plan["calibration_rel"] = error
        if adjustments:
            plan["adjusted"] = adjustments
        self.results[site.path] = SiteResult(site, plan, tensors, error, adjustments)
        self.progress(site)


@dataclass
class _Measure:
    """One closed-loop step: plan a site for a budget, build its heads, measure their error
    against the source on the calibration inputs (float64 reference)."""
    site: Site
    stats: SiteStats
    work: SiteWork
    inputs: tuple
    reference: torch.Tensor
    calibrator: "Calibrator"

    def __call__(self, budget: Budget) -> tuple[dict, dict, float]:
        c = self.calibrator
        plan, tensors = plan_site(self.site, self.stats, c.tolerance, c.context, budget)
        module = self.work.converted_module(plan, tensors, c.dtype)
        return plan, tensors, relative_error(self.work.converted(module, self.inputs, c.dtype), self.reference)


def _fewer_heads(measure: _Measure, budget: Budget, accepted: tuple, limit: float) -> tuple[dict, dict, float]:
    """Step the heads per unit down while the measured error stays within the limit: the fit
    budget bounds the activation's pointwise error, the layer's own error is what counts."""
    while accepted[0]["heads_per_unit"] > 1:
        budget = budget.fewer_heads(accepted[0]["heads_per_unit"])
        trial = measure(budget)
        if trial[0]["heads_per_unit"] >= accepted[0]["heads_per_unit"] or trial[2] > limit:
            break
        accepted = trial
    return accepted


class LocalCheck:
    """on_inputs for the check pass: each site's converted heads against its source in float64."""

    def __init__(self, probe, weights, results: dict[str, SiteResult], dtype: torch.dtype, device: torch.device,
                 progress=None):
        self.probe, self.weights, self.results, self.dtype, self.device = probe, weights, results, dtype, device
        self.errors: dict[str, float] = {}
        self.progress = progress or (lambda site: None)

    def __call__(self, site: Site, inputs) -> None:
        work = SiteWork(site, self.probe, self.weights, self.device)
        result = self.results[site.path]
        module = work.converted_module(result.plan, result.tensors, self.dtype)
        error = relative_error(work.converted(module, inputs, self.dtype), work.reference(inputs))
        self.errors[site.path] = max(error, self.errors.get(site.path, 0.0))
        self.progress(site)
