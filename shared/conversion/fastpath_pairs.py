"""Exact O(n) evaluation of product pairs (docs/DESIGN.md §4), on fastpath's prefix sums,
column ranges and blocks.

The exact identity for the sum of the two heads
(z = eps s, V = (2/eps) u, C/S/A/B sums of cosh z_j, sinh z_j, V_j cosh z_j,
V_j sinh z_j over the other visible keys, n = e^{-omega}):

    out_i = [V_i (2 sinh z_i + 2n (sinh z_i C - cosh z_i S))
             + 2n (cosh z_i B - sinh z_i A + B + n (B C - A S))] / (den+ den-)
    den+- = e^{+-z_i} + 1 + n (C +- S)

which never subtracts two O(1/eps) quantities, so fp32 keeps ~1e-7 relative error
for any eps (evaluating the heads separately loses a factor 1/eps). It does lose
~e^{2 max|z|} ulps for large |z| (C - S = sum e^{-z_j}): fp32 is used up to
max |eps s| = 0.5, fp64 beyond (the construction keeps |eps s| far below 0.1).

Negligible leakage (fastpath.NEGLIGIBLE_LEAK): the pair is (2/eps) u tanh(eps s / 2)
(`_pair_self_only`). Inference only: the public functions run under torch.no_grad().
"""
import math
import warnings

import torch

from .fastpath import (
    NEGLIGIBLE_LEAK, add_carry, chunk_prefix_sums, column_blocks, column_range, keep_mask, work_dtype,
)

# Product pairs: the cosh/sinh identity loses ~e^{2 max|z|} ulps (sums like C - S = sum e^{-z_j}
# cancel once |z| is large), so it runs in fp32 up to max |eps s| = 0.5, in fp64 up to 9 (< 1e-8),
# and beyond that in fp64 with a warning (there the pair's own tanh error is O(1): eps is mis-set).
_PAIR_Z_FP32 = 0.5
_PAIR_Z_FP64 = 9.0
_PAIR_Z_MAX = 300.0  # cosh(z)^2 n^2 |V| overflows fp64 beyond this


def _pair_parts(s, u, eps):
    z = eps * s  # (B, T, F)
    return u * (2.0 / eps), torch.cosh(z), torch.sinh(z)  # V, cosh z, sinh z


def _pair_combine(V, ch, sh, sums, n):
    """Sum of the +eps and -eps heads (B, T, F) from V = (2/eps) u, cosh z, sinh z and the other
    visible keys' sums (B, T, 4, F) of cosh, sinh, V cosh, V sinh; n = e^-omega.
    e^{+-z} = cosh z +- sinh z: exact to the identity's own e^{2|z|} ulps."""
    C, S, A, B = sums.unbind(dim=2)  # (B, T, F) each
    den = torch.add(C, S).mul_(n).add_(ch).add_(sh).add_(1.0)  # e^z + 1 + n (C + S)
    den.mul_(torch.sub(C, S).mul_(n).add_(ch).sub_(sh).add_(1.0))  # times e^-z + 1 + n (C - S)
    self_part = torch.mul(sh, C).addcmul_(ch, S, value=-1.0).mul_(n).add_(sh)  # sinh z + n (sinh z C - cosh z S)
    cross = B.mul(C).addcmul_(A, S, value=-1.0).mul_(n).add_(B).addcmul_(ch, B).addcmul_(sh, A, value=-1.0)
    return self_part.mul_(V).add_(cross, alpha=n).mul_(2.0).div_(den)


def _pair_terms(s, u, keep, masked, eps, out):
    """out[:, :T] = cosh z, sinh z, V cosh z, V sinh z per key (B, T, 4, F), 0 for padded keys; returns V."""
    T = s.shape[1]
    z, V = eps * s, u * (2.0 / eps)
    ch, sh = torch.cosh(z, out=out[:, :T, 0]), torch.sinh(z, out=out[:, :T, 1])
    torch.mul(V, ch, out=out[:, :T, 2])
    torch.mul(V, sh, out=out[:, :T, 3])
    if masked:
        out[:, :T].masked_fill_(~keep.unsqueeze(2), 0.0)
    return V


def _check_pair_args(s, u, eps, omega):
    B, T, F = s.shape
    assert T >= 1 and u.shape == (B, T, F) and eps.shape == (F,), (tuple(s.shape), tuple(u.shape), tuple(eps.shape))
    assert omega >= 0, f"omega must be >= 0, got {omega}"
    assert bool((eps != 0).all()), "product pairs need eps != 0"


def _pair_range(s, eps, keep, masked, zmax_past):
    """max |eps s| over the real keys and the past; warns once past the accurate range."""
    smax, smin = column_range(s, keep, masked)  # (B, 1, F)
    zmax = max(float((eps.abs() * torch.maximum(smax, -smin)).max()), zmax_past)
    assert zmax <= _PAIR_Z_MAX, f"product pair keys reach |eps s| = {zmax:.3g}: eps or s far out of range"
    if zmax > _PAIR_Z_FP64 >= zmax_past:
        warnings.warn(f"fastpath: product pair keys reach |eps s| = {zmax:.3g}; accuracy degrades as e^(2|eps s|)")
    return zmax


def _pairs(s, u, eps, omega, key_padding_mask, causal, past64, zmax_past=0.0):
    """(out (B, T, F), causal totals (B, 1, 4, F) or None, max |eps s| of all real keys so far).

    Computed in the working dtype while max |eps s| <= 0.5, else in float64; block by block of columns.
    """
    B, T, F = s.shape
    keep, masked = keep_mask(key_padding_mask, B, T, s.device)
    eps = eps.to(s.device)
    zmax = _pair_range(s, eps.to(s.dtype), keep, masked, zmax_past)
    dtype = work_dtype(s.dtype) if zmax <= _PAIR_Z_FP32 else torch.float64
    s, u, eps = (t.to(dtype).contiguous() for t in (s, u, eps))
    n = math.exp(-omega)
    out = torch.empty_like(s)
    total = torch.empty(B, 1, 4, F, dtype=dtype, device=s.device) if causal else None
    for cols, work in column_blocks(B, T, F, s, rows=4):
        w = cols.stop - cols.start
        V = _pair_terms(s[:, :, cols], u[:, :, cols], keep, masked, eps[cols], work.terms)  # terms: (B, Tp, 4, w)
        terms = work.terms[:, :T]
        if causal:
            carry, block_total = chunk_prefix_sums(work.terms.view(B, -1, 4 * w), work.P.view(B, -1, 4 * w))
            total[:, :, :, cols] = block_total.view(B, 1, 4, w)
            sums = add_carry(work.P, carry + past64[:, :, :, cols].reshape(B, 1, 4 * w).to(dtype))[:, :T]
        else:
            sums = torch.sub(terms.sum(dim=1, keepdim=True), terms, out=work.P[:, :T])  # totals minus self
        out[:, :, cols] = _pair_combine(V, terms[:, :, 0], terms[:, :, 1], sums, n)  # padded queries: cosh = 0
    return out, total, zmax


def _pair_self_only(s, u, eps):
    """The pair's output without leakage, (2/eps) u tanh(eps s / 2) (B, T, F): sigma(z) - sigma(-z)
    = tanh(z / 2), with no cancellation at any eps."""
    dtype = work_dtype(s.dtype)
    eps = eps.to(device=s.device, dtype=dtype)
    return torch.mul(s.to(dtype), eps / 2).tanh_().mul_(u.to(dtype)).mul_(2.0 / eps)


def _pair_token(s, u, real, eps, omega, sums, zmax_past):
    """One new token (B, 1, F) from the running sums (B, 1, 4, F), float64; real: (B, 1, 1)."""
    s, u, eps = s.double(), u.double(), eps.to(device=s.device, dtype=torch.float64)
    zmax = _pair_range(s, eps, real, True, zmax_past)
    V, ch, sh = _pair_parts(s, u, eps)
    out = _pair_combine(V, ch, sh, sums, math.exp(-omega))  # (B, 1, F)
    own = torch.stack((ch, sh, V * ch, V * sh), dim=2)  # (B, 1, 4, F)
    return out, torch.where(real.unsqueeze(3), own, 0.0), zmax


@torch.no_grad()
def fast_product_pairs(s, u, eps, omega, *, causal, key_padding_mask=None):
    """Same as heads.dense_product_pairs in O(T): s, u (B, T, F); eps (F,) -> (B, T, F)."""
    omega = float(omega)
    _check_pair_args(s, u, eps, omega)
    B, T, F = s.shape
    keep, masked = keep_mask(key_padding_mask, B, T, s.device)
    zmax = _pair_range(s, eps.to(device=s.device, dtype=s.dtype), keep, masked, 0.0)
    if zmax - omega + math.log(2 * T) <= NEGLIGIBLE_LEAK:  # other keys: < e^-60 of each denominator (>= 1)
        return _pair_self_only(s, u, eps).to(s.dtype)
    past64 = torch.zeros(B, 1, 4, F, dtype=torch.float64, device=s.device)
    out, _, _ = _pairs(s, u, eps, omega, key_padding_mask, causal, past64)
    return out.to(s.dtype)


class ProductPairsCache:
    """Incremental causal decoding of product pairs: per (b, k) the float64 sums of cosh z_j,
    sinh z_j, V_j cosh z_j, V_j sinh z_j over the past real keys. step(s, u) takes (B, T, F)."""

    def __init__(self, eps, omega):
        assert eps.dim() == 1 and omega >= 0
        self.eps, self.omega = eps, float(omega)
        self.sums = None  # (B, 1, 4, F) float64
        self.zmax = 0.0  # max |eps s| over the past keys: decides the working precision

    @torch.no_grad()
    def step(self, s_t, u_t, key_padding_mask=None):
        _check_pair_args(s_t, u_t, self.eps, self.omega)
        B, T, F = s_t.shape
        if self.sums is None:
            self.sums = torch.zeros(B, 1, 4, F, dtype=torch.float64, device=s_t.device)
        assert self.sums.shape == (B, 1, 4, F), "batch size changed under a cache"
        if T == 1:  # decoding: float64 from the running sums
            real = keep_mask(key_padding_mask, B, T, s_t.device)[0]  # (B, 1, 1)
            out, total, self.zmax = _pair_token(s_t, u_t, real, self.eps, self.omega, self.sums, self.zmax)
        else:
            out, total, self.zmax = _pairs(s_t, u_t, self.eps, self.omega, key_padding_mask, True, self.sums, self.zmax)
        self.sums = self.sums + total.double()
        return out.to(s_t.dtype)
