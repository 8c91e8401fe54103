"""The sigmoid mixtures: their stated errors are their real errors, the shipped fit table
is what fit_gelu computes, and more tolerance never buys more heads."""
import pytest
import torch

from shared.conversion.activations import (FIT_HEADS, _fit_table, exact_activation, fit_gelu, fit_key,
                                           mixture_for)


@pytest.mark.parametrize("name,heads,fit_range", [("gelu_tanh", 10, 4.0), ("gelu_erf", 6, 32.0), ("gelu_tanh", 1, 1.0)])
def test_shipped_table_matches_a_fresh_fit(name, heads, fit_range):
    stored = _fit_table()[fit_key(name, heads, fit_range)]
    fresh = fit_gelu(name, heads, fit_range)
    assert stored[0] == pytest.approx(list(fresh.a), rel=1e-12)
    assert stored[2] == pytest.approx(list(fresh.g), rel=1e-9, abs=1e-12)
    assert stored[3] == pytest.approx(fresh.max_abs_error, rel=1e-6)


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
