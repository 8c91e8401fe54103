"""plan_site: how calibration statistics become head parameters."""
import math

import torch

from shared.conversion.construct import RANGE_MARGIN, Budget, SiteStats, plan_site
from shared.conversion.patterns import Experts, Site


def test_an_expert_calibration_never_routed_to_gets_the_sites_product_gain():
    """An expert that saw no calibration token (all its statistics 0) may be routed to on
    other text: its product pairs must be sized for the site's range, not for 0 (eps ~1e3
    saturates tanh and the expert's output is garbage; seen in a 16-layer Mixtral)."""
    E, F = 3, 4
    gate_out = torch.tensor([[2.0, 1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    site = Site(path="model.layers.0.mlp.experts", pattern=Experts(), activation="silu", causal=True, units=F)
    stats = SiteStats(pre_abs=torch.tensor([4.0, 0.0, 2.0]), gate_out_abs=gate_out)
    tolerance, budget = 1e-5, Budget()
    plan, tensors = plan_site(site, stats, tolerance, context=32, budget=budget)
    eps = tensors["eps"].double()
    assert eps.shape == (E, F)
    expected = math.sqrt(12 * budget.product * tolerance) / (RANGE_MARGIN * 3.0)
    assert torch.allclose(eps, torch.full((E, F), expected, dtype=torch.float64), rtol=1e-6)
    # the pair's relative error (eps s)^2 / 12 stays within its share wherever s is inside the range
    assert float((eps * RANGE_MARGIN * 3.0).max()) ** 2 / 12 <= budget.product * tolerance * (1 + 1e-6)
    assert plan["eps_max"] == plan["eps_min"]
