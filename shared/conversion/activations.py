"""Activations as sums of sigmoid-gated heads: phi(x) ~= sum_m g_m * x * sigmoid(a_m x + c_m).

A neuron head with key a*u + c, value u and output scale g computes exactly one term
(DESIGN.md §2). SiLU and quick_gelu are exact with one head; GELU (erf and tanh forms)
is fitted on the calibrated input range; ReLU uses one head with a large gain.
"""
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy
import torch


@dataclass(frozen=True)
class Mixture:
    a: tuple  # (M,) gains
    c: tuple  # (M,) offsets
    g: tuple  # (M,) output scales
    max_abs_error: float  # max |mixture - phi| on [-fit_range, fit_range]
    fit_range: float

    @property
    def heads(self) -> int:
        return len(self.a)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, c, g = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (self.a, self.c, self.g))
        return (g * x[..., None] * torch.sigmoid(a * x[..., None] + c)).sum(-1)


def exact_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The source activation, as transformers computes it."""
    if name == "gelu_erf":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return torch.relu(x)
    if name == "relu2":  # squared ReLU = relu(x) * x: a ReLU gate times the value, a product (DESIGN.md §4)
        return torch.relu(x) * x
    raise ValueError(f"unknown activation {name!r}")


def mixture_for(name: str, input_range: float, tolerance: float, max_heads: int = 16) -> Mixture:
    """The cheapest mixture whose error on [-input_range, input_range] is below
    `tolerance` relative to the activation's scale there (phi(input_range) ~ input_range)."""
    if name == "silu":
        return Mixture((1.0,), (0.0,), (1.0,), 0.0, math.inf)
    if name == "quick_gelu":
        return Mixture((1.702,), (0.0,), (1.0,), 0.0, math.inf)
    if name in ("relu", "relu2"):  # relu2: the mixture of its ReLU gate
        return relu_mixture(input_range, tolerance)
    fit_range = _range_bucket(input_range)
    budget = tolerance * fit_range
    best = None
    for heads in FIT_HEADS:
        if heads > max_heads:
            break
        mixture = fitted_gelu(name, heads, fit_range)
        if best is None or mixture.max_abs_error < best.max_abs_error:
            best = mixture
        if mixture.max_abs_error <= budget:
            return mixture
    return best


def relu_mixture(input_range: float, tolerance: float) -> Mixture:
    # max_x |relu(x) - x sigmoid(a x)| = 0.2785 / a, reached at |x| = 1.2785 / a
    fit_range = max(input_range, 1e-3)
    gain = 0.2785 / (tolerance * fit_range)
    return Mixture((gain,), (0.0,), (1.0,), 0.2785 / gain, fit_range)


def _range_bucket(x: float) -> float:
    """Round the range up to a power of two (at least 1) so fits are shared between layers."""
    return float(2 ** max(0, math.ceil(math.log2(max(x, 1.0)))))


FIT_TABLE = Path(__file__).with_name("gelu_fits.json")  # made by tools/make_gelu_fit_table.py
FIT_HEADS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)


def fit_key(name: str, heads: int, fit_range: float) -> str:
    return f"{name}/{heads}/{fit_range:g}"


@lru_cache(maxsize=1)
def _fit_table() -> dict:
    return json.loads(FIT_TABLE.read_text()) if FIT_TABLE.is_file() else {}


@lru_cache(maxsize=None)
def fitted_gelu(name: str, heads: int, fit_range: float) -> Mixture:
    """The fit of `fit_gelu`, from the shipped table when it holds it (fitting costs ~0.3 s
    per entry, seconds per conversion), else computed."""
    entry = _fit_table().get(fit_key(name, heads, fit_range))
    if entry is None:
        return fit_gelu(name, heads, fit_range)
    a, c, g, error = entry
    return Mixture(tuple(a), tuple(c), tuple(g), error, fit_range)


def fit_gelu(name: str, heads: int, fit_range: float) -> Mixture:
    """Fit sum_m g_m x sigmoid(a (x - mu_m)) to GELU on [-R, R] in float64.

    GELU's gate Φ is a smooth CDF; a CDF is well approximated by logistic CDFs placed at
    Gauss-Hermite nodes. For each (spread of the nodes, common gain a) on a small grid the
    output scales g enter linearly and are solved by least squares with sum(g) = 1 (so
    phi(x) -> x beyond the range); the grid point with the smallest max error wins.
    Deterministic, and well under a second per fit.
    """
    x = torch.linspace(-fit_range, fit_range, 1501, dtype=torch.float64)
    target = exact_activation(name, x)
    one = torch.ones(1, dtype=torch.float64)
    if heads == 1:
        a, c = torch.tensor([1.702], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        return Mixture((1.702,), (0.0,), (1.0,), _max_error(x, target, a, c, one), fit_range)
    nodes = torch.tensor(numpy.polynomial.hermite.hermgauss(heads)[0], dtype=torch.float64) * math.sqrt(2)
    spreads = torch.linspace(0.2, 2.0, 19, dtype=torch.float64)
    log_gains = torch.linspace(0.0, math.log(12.0), 21, dtype=torch.float64)
    spread, log_gain = _grid_search(x, target, nodes, spreads, log_gains)
    # refine on a finer grid around the coarse optimum
    spread, log_gain = _grid_search(x, target, nodes,
                                    spread + torch.linspace(-0.1, 0.1, 9, dtype=torch.float64),
                                    log_gain + torch.linspace(-0.06, 0.06, 9, dtype=torch.float64))
    a = torch.exp(log_gain).expand(heads).clone()
    c = -a * nodes * spread
    g = _solve_scales(x, target, a[None], c[None])[0]
    return Mixture(tuple(a.tolist()), tuple(c.tolist()), tuple(g.tolist()), _max_error(x, target, a, c, g), fit_range)


def _grid_search(x, target, nodes, spreads, log_gains):
    """The (spread, log gain) of the grid whose least-squares fit has the smallest max error."""
    spread, log_gain = torch.meshgrid(spreads.clamp_min(0.05), log_gains, indexing="ij")
    spread, log_gain = spread.reshape(-1), log_gain.reshape(-1)  # (G,)
    a = torch.exp(log_gain)[:, None].expand(-1, len(nodes))  # (G, M)
    c = -a * nodes[None] * spread[:, None]
    g = _solve_scales(x, target, a, c)  # (G, M)
    errors = (_basis(x, a, c) @ g[..., None])[..., 0].sub(target).abs().amax(-1)  # (G,)
    best = int(errors.argmin())
    return spread[best], log_gain[best]


def _basis(x, a, c):
    """x sigmoid(a x + c) for every grid point: a, c (G, M) -> (G, N, M)."""
    return x[:, None] * torch.sigmoid(a[..., None, :] * x[:, None] + c[..., None, :])


def _max_error(x, target, a, c, g) -> float:
    return (_basis(x, a, c) @ g - target).abs().max().item()


def _solve_scales(x, target, a, c):
    """g (G, M) with sum(g) = 1 minimising ||basis g - target||_2 (substitute g_M = 1 - sum(others))."""
    basis = _basis(x, a, c)  # (G, N, M)
    reduced = basis[..., :-1] - basis[..., -1:]
    rhs = (target - basis[..., -1])[..., None]  # (G, N, 1)
    head = torch.linalg.lstsq(reduced, rhs).solution[..., 0]  # (G, M-1)
    return torch.cat([head, 1 - head.sum(-1, keepdim=True)], dim=-1)
