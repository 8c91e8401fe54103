"""Minimax refinement of a GELU sigmoid mixture, offline (needs scipy; used by
tools/make_gelu_fit_table.py, never at conversion time).

The quick fit (shared.conversion.activations.fit_gelu) places heads at scaled Gauss-Hermite
nodes with one common gain and solves the output scales by least squares: fast, but far from
the best mixture for its head count. Here every head's gain, offset and scale is free and the
maximum error is minimised directly: a smoothed max (L_q norms, q doubling) by BFGS, then
Lawson's iteratively reweighted least squares by Levenberg-Marquardt from a few perturbed
starts. The mixture stays symmetric (heads in pairs a, +-c, g, plus a centre head when M is
odd) with sum(g) = 1, so its gate minus 1/2 is odd like GELU's, the error is even, only
[0, R] needs sampling, and phi(x) -> x beyond the range as the quick fit guarantees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares, minimize
from scipy.special import expit

from shared.conversion.activations import Mixture, exact_activation


@dataclass(frozen=True)
class Effort:
    restarts: int = 4  # Lawson runs from perturbed starts (the first unperturbed)
    lawson_steps: int = 25
    seed: int = 0


def sample_points(fit_range: float) -> np.ndarray:
    """[0, R]: dense where GELU bends (|x| <= 8), sparser in the tail where the error decays."""
    near = np.linspace(0.0, min(fit_range, 8.0), 1601)
    if fit_range <= 8.0:
        return near
    return np.concatenate([near, np.geomspace(8.0, fit_range, 400)[1:]])


def _unpack(p: np.ndarray, heads: int):
    """Free parameters -> a, c, g (M,). Pairs first (P = M // 2), then the centre head."""
    P = heads // 2
    a, c = p[:P], p[P:2 * P]
    if heads % 2:
        g = p[2 * P:3 * P]
        return (np.concatenate([a, a, p[-1:]]), np.concatenate([c, -c, [0.0]]),
                np.concatenate([g, g, [1.0 - 2.0 * g.sum()]]))
    g = np.concatenate([p[2 * P:3 * P - 1], [0.0]])
    g[-1] = 0.5 - g[:-1].sum()
    return np.concatenate([a, a]), np.concatenate([c, -c]), np.concatenate([g, g])


def _pack(mixture: Mixture) -> np.ndarray:
    a, c, g = (np.asarray(v, dtype=float) for v in (mixture.a, mixture.c, mixture.g))
    M, P = len(a), len(a) // 2
    order = np.argsort(-c)  # largest offsets first: the positive member of each pair
    pairs = order[:P]
    p = [a[pairs], np.abs(c[pairs])]
    if M % 2:
        # the quick fit's pairs have equal scales; average them to symmetrise exactly
        p += [(g[pairs] + g[order[::-1][:P]]) / 2, a[order[P:P + 1]]]
    else:
        p += [((g[pairs] + g[order[::-1][:P]]) / 2)[:-1]]
    return np.concatenate(p)


def _error(p, heads, x, target):
    a, c, g = _unpack(p, heads)
    return x * (expit(a[None] * x[:, None] + c[None]) @ g) - target


def refine(name: str, start: Mixture, fit_range: float, effort: Effort = Effort()) -> Mixture:
    """The best mixture found from `start` (same head count); never worse than `start`
    as measured on the same points."""
    heads = start.heads
    if heads < 2:
        return start
    x = sample_points(fit_range)
    target = exact_activation(name, torch.from_numpy(x)).numpy()
    best_p = _pack(start)
    best = np.abs(_error(best_p, heads, x, target)).max()
    p = best_p
    for q in (6, 12, 24, 48, 96, 192):  # smoothed max, sharpened step by step
        def smooth_max(p, q=q):
            e = np.abs(_error(p, heads, x, target))
            m = e.max()
            return m * np.mean((e / m) ** q) ** (1 / q)
        p = minimize(smooth_max, p, method="BFGS", options={"maxiter": 300, "gtol": 1e-15}).x
        err = np.abs(_error(p, heads, x, target)).max()
        if err < best:
            best, best_p = err, p
        p = best_p
    rng = np.random.default_rng(effort.seed)
    for restart in range(effort.restarts):
        p = best_p * (1 + 0.15 * rng.standard_normal(best_p.shape)) if restart else best_p.copy()
        weights = np.full_like(x, 1.0 / len(x))
        for _ in range(effort.lawson_steps):
            p = least_squares(lambda p: np.sqrt(weights) * _error(p, heads, x, target), p, method="lm",
                              xtol=1e-15, ftol=1e-15, max_nfev=2000).x
            e = np.abs(_error(p, heads, x, target))
            if not np.isfinite(e).all():
                break
            if e.max() < best:
                best, best_p = e.max(), p
            weights = weights * e
            weights /= weights.sum()
    a, c, g = _unpack(best_p, heads)
    return Mixture(tuple(a.tolist()), tuple(c.tolist()), tuple(g.tolist()),
                   max_error_on(name, a, c, g, fit_range), fit_range)


def max_error_on(name: str, a, c, g, fit_range: float) -> float:
    """A mixture's max |error| on [-R, R], measured as the tests measure it (20,001 points,
    float64) and on the refinement's own points: whichever is larger."""
    dense = torch.linspace(-fit_range, fit_range, 20001, dtype=torch.float64)
    x = torch.cat([dense, torch.from_numpy(sample_points(fit_range))])
    mixture = Mixture(tuple(map(float, a)), tuple(map(float, c)), tuple(map(float, g)), math.nan, fit_range)
    return (mixture(x) - exact_activation(name, x)).abs().max().item()
