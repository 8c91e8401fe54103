"""plan_site: how calibration statistics become head parameters."""
import math

import torch

from shared.conversion.construct import RANGE_MARGIN, Budget, SiteStats, plan_site
from shared.conversion.patterns import Experts, Plain, Site


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


def test_omega_puts_leakage_below_rounding():
    """Omega for keys up to 4x the widened range: n e^{max key - Omega} <= e^-LEAK_EXPONENT, whatever the tolerance."""
    from shared.conversion.construct import LEAK_EXPONENT, OMEGA_RANGE

    site = Site(path="h.0.mlp", pattern=Plain(act="act", up="c_fc", down="c_proj"), activation="gelu_tanh", causal=True, units=8)
    for tolerance in (1e-3, 1e-5, 1e-10):
        plan, tensors = plan_site(site, SiteStats(pre_abs=torch.tensor(3.0)), tolerance, context=1024, budget=Budget())
        a, c = tensors["a"].double(), tensors["c"].double()
        max_key = float((a.abs() * OMEGA_RANGE * plan["input_range"] + c.abs()).max())
        assert math.log(1024) + max_key - plan["omega"] <= -LEAK_EXPONENT + 1e-9


def test_fewer_heads_steps_down_while_the_measured_error_allows():
    """The closed loop's step down: a budget of at most M - 1 heads per unit, kept while the
    measured error stays within the limit, stopped at the first miss or when M stops falling."""
    from shared.conversion.calibrate import _fewer_heads

    errors = {8: 1e-7, 6: 2e-7, 5: 9e-6, 4: 1e-7}  # 4 would pass, but the step to 5 already misses
    asked = []

    def measure(budget):
        heads = max(h for h in errors if h <= budget.max_heads)
        asked.append(heads)
        return {"heads_per_unit": heads}, {}, errors[heads]

    plan, _, error = _fewer_heads(measure, Budget(), ({"heads_per_unit": 8}, {}, 1e-7), limit=2.5e-6)
    assert (plan["heads_per_unit"], error, asked) == (6, 2e-7, [6, 5])
    # a step that does not lower the heads (one head already) ends the loop
    plan, _, _ = _fewer_heads(lambda b: ({"heads_per_unit": 1}, {}, 0.0), Budget(), ({"heads_per_unit": 1}, {}, 0.0), 1.0)
    assert plan["heads_per_unit"] == 1
