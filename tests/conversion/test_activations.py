"""The sigmoid mixtures: their stated errors are their real errors, the shipped fit table
is never worse than what fit_gelu computes, and more tolerance never buys more heads."""
import pytest
import torch

from shared.conversion.activations import (FIT_HEADS, Mixture, _fit_table, exact_activation, fit_gelu, fit_key,
                                           mixture_for)


@pytest.mark.parametrize("name,heads,fit_range", [("gelu_tanh", 10, 4.0), ("gelu_erf", 6, 32.0), ("gelu_tanh", 8, 256.0),
                                                   ("gelu_tanh", 5, 16.0), ("gelu_tanh", 1, 1.0)])
def test_shipped_fit_states_its_real_error_and_beats_the_quick_fit(name, heads, fit_range):
    """The table holds minimax-refined fits (tools/make_gelu_fit_table.py): each entry's stated
    error is its measured error, and no entry is worse than what fit_gelu computes at run time."""
    a, c, g, stated = _fit_table()[fit_key(name, heads, fit_range)]
    shipped = Mixture(tuple(a), tuple(c), tuple(g), stated, fit_range)
    x = torch.linspace(-fit_range, fit_range, 20001, dtype=torch.float64)
    measured = (shipped(x) - exact_activation(name, x)).abs().max().item()
    assert measured <= stated * (1 + 1e-9) + 1e-16
    assert sum(g) == pytest.approx(1.0, abs=1e-9)  # phi(x) -> x beyond the range
    quick = fit_gelu(name, heads, fit_range)
    assert stated <= (quick(x) - exact_activation(name, x)).abs().max().item() * (1 + 1e-6) + 1e-16


def test_table_covers_every_bucket_and_head_count():
    for name in ("gelu_tanh", "gelu_erf"):
        for k in range(9):
            for heads in FIT_HEADS:
                assert fit_key(name, heads, float(2**k)) in _fit_table()


@pytest.mark.parametrize("name", ["gelu_tanh", "gelu_erf"])
@pytest.mark.parametrize("input_range", [0.7, 5.0, 60.0])
def test_mixture_error_is_what_it_claims_and_meets_the_budget(name, input_range):
    mixture = mixture_for(name, input_range, 1e-6)
    x = torch.linspace(-mixture.fit_range, mixture.fit_range, 20001, dtype=torch.float64)
    error = (mixture(x) - exact_activation(name, x)).abs().max().item()
    assert error <= mixture.max_abs_error * 1.05 + 1e-15
    assert error <= 1e-6 * mixture.fit_range


def test_looser_tolerance_never_needs_more_heads():
    heads = [mixture_for("gelu_tanh", 8.0, tol).heads for tol in (1e-8, 1e-6, 1e-4, 1e-2)]
    assert heads == sorted(heads, reverse=True) and heads[0] > heads[-1]
