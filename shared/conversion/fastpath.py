"""Exact O(n) evaluation of neuron-head groups and product pairs (DESIGN.md §2, §4, §6).

The same softmax attention as `heads.py`, leakage included, without the T x T scores.
A head's query is the constant 1, so for query i the softmax over {self, null, other
visible keys j} only needs sums over the visible keys. Factoring e^omega out of every
score exactly (never adding omega to a score in floating point), the weights are

    self  e^{z_i}        null  1        other visible key j  e^{z_j - omega}

    out_i = (e^{z_i} v_i + e^{-omega} Q_i) / (e^{z_i} + 1 + e^{-omega} S_i)
    S_i = sum_{j visible, j != i} e^{z_j},  Q_i = sum_{j visible, j != i} e^{z_j} v_j

S and Q are prefix sums over j < i (causal) or totals minus self (bidirectional).

Stabilisation. Per column (b, m, k) we take Z = max_j z_j over the real keys and sum
e^{z_j - Z} <= 1; per query, numerator and denominator are divided by e^{s_i} with
s_i = max(F_i, Z - omega), F_i = max(z_i, 0) (null slot) or z_i (no null slot), so
no exponent is positive: nothing overflows for any omega or |z| (omega = 1e6 and
|z| = 1e5 are fine), and the leakage keeps its exact weight e^{Z - omega - s_i} S_i.
A per-column Z can flush to zero terms with z_j < Z - 87 (fp32). Bidirectionally
every query sees the max key, so those terms are < T e^{-87} of its denominator. In a
causal prefix that lies before the max key they are bounded by
T e^{Z - omega - min_i F_i - 87}: where that bound is not negligible (a head whose
leakage is e^{60} times its self weight, i.e. a broken Omega), the columns concerned
are recomputed exactly in float64 log-space (`_exact_causal`). Calibrated layers
never take that path.

Product pairs (DESIGN.md §4) use the exact identity for the sum of the two heads
(z = eps s, V = (2/eps) u, C/S/A/B sums of cosh z_j, sinh z_j, V_j cosh z_j,
V_j sinh z_j over the other visible keys, n = e^{-omega}):

    out_i = [V_i (2 sinh z_i + 2n (sinh z_i C - cosh z_i S))
             + 2n (cosh z_i B - sinh z_i A + B + n (B C - A S))] / (den+ den-)
    den+- = e^{+-z_i} + 1 + n (C +- S)

which never subtracts two O(1/eps) quantities, so fp32 keeps ~1e-7 relative error
for any eps (evaluating the heads separately loses a factor 1/eps). It does lose
~e^{2 max|z|} ulps for large |z| (C - S = sum e^{-z_j}): fp32 is used up to
max |eps s| = 0.5, fp64 beyond (the construction keeps |eps s| far below 0.1).

Pointwise stages are compiled with torch.compile for large inputs when it works (eager
on any failure); causal prefix sums are chunked triangular GEMMs (chunk_prefix_sums).
Inference only: the public functions run under torch.no_grad().
"""
import math
import os
import warnings

import torch

_COMPILE = os.environ.get("CONVERSION_FASTPATH_COMPILE", "1") != "0"
COMPILE_MIN_ELEMENTS = 1 << 18  # smaller inputs run eager: a compile costs seconds, small eager calls are cheap
# Product pairs: the cosh/sinh identity loses ~e^{2 max|z|} ulps (sums like C - S = sum e^{-z_j}
# cancel once |z| is large), so it runs in fp32 up to max |eps s| = 0.5, in fp64 up to 9 (< 1e-8),
# and beyond that in fp64 with a warning (there the pair's own tanh error is O(1): eps is mis-set).
_PAIR_Z_FP32 = 0.5
_PAIR_Z_FP64 = 9.0
_PAIR_Z_MAX = 300.0  # cosh(z)^2 n^2 |V| overflows fp64 beyond this
_INF = float("inf")
CHUNK = 8  # rows per chunk of the causal prefix sums


def set_compile(enabled: bool):
    """Use torch.compile for large inputs (the default; env CONVERSION_FASTPATH_COMPILE=0 turns it off)."""
    global _COMPILE
    _COMPILE = bool(enabled)


class _Kernel:
    """A pure tensor function, compiled on first large use; eager for good once compiling or running it fails."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if _COMPILE and not self.failed and args[0].numel() >= COMPILE_MIN_ELEMENTS:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
                return self.compiled(*args)
            except Exception as exc:  # no compiler, unsupported op, too many recompiles: same math, eager
                self.failed = True
                warnings.warn(f"fastpath: torch.compile failed for {self.fn.__name__}, running eager ({exc!r:.300})")
        return self.fn(*args)


def _span_limit(dtype):
    """Largest Z - omega - min F + ln n for which the per-column stabiliser drops < e^-25 of any denominator."""
    return -math.log(torch.finfo(dtype).tiny) - 25.0  # fp32: 62.3, fp64: 683


def _work_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _scalar(x, like):
    return torch.tensor(x, dtype=like.dtype, device=like.device)  # 0-dim: one compiled graph for every value


# --- pointwise kernels (compiled for large inputs) -------------------------------------
# keep: (B, T, 1) bool, True = real key. floor: 0-dim, 0 with a null slot, -inf without.
# Causal sums arrive as P (B, Tp, W), the sum over earlier rows of the same chunk of
# CHUNK rows, and carry (B, Tp / CHUNK, W), the sum over earlier chunks (chunk_prefix_sums).

def _combine(z, v, S, Q, zw, floor):
    """One head's output from its sums. z, v, S, Q: (B, T, F); zw = Z - omega: (B, 1, F).

    S, Q: sums of e^{z_j - Z} and e^{z_j - Z} v_j over the other visible keys. The weights
    e^{z - s}, e^{floor - s}, e^{zw - s}, s = max(z, floor, zw), take two exps: one exponent is 0.
    """
    m = torch.maximum(z, floor)  # (B, T, F)
    t = torch.exp(-(z - floor).abs())  # e^{min - max} of self and null; 0 without a null slot
    self_w, null_w = torch.where(z >= floor, 1.0, t), torch.where(z >= floor, t, 1.0)
    r = torch.exp(-(zw - m).abs())
    leak_up = zw > m  # the other keys' scale dominates: s = zw
    leak = torch.where(leak_up, 1.0, r)  # key j's weight is leak * e^{z_j - Z}
    self_w, null_w = torch.where(leak_up, self_w * r, self_w), torch.where(leak_up, null_w * r, null_w)
    den = self_w + null_w + leak * S
    return (self_w * v + leak * Q) / den.clamp_min(torch.finfo(den.dtype).tiny)


def _pad_rows(x):
    """Zero rows appended along dim 1 up to a multiple of CHUNK."""
    pad = (-x.shape[1]) % CHUNK
    return torch.cat((x, x.new_zeros(x.shape[0], pad, *x.shape[2:])), dim=1)


def _spread(carry, T):
    """carry (B, nC, ...) -> (B, T, ...): row t gets carry[t // CHUNK] (a view, no copy when compiled)."""
    B, nC = carry.shape[:2]
    return carry.unsqueeze(2).expand(B, nC, CHUNK, *carry.shape[2:]).reshape(B, nC * CHUNK, *carry.shape[2:])[:, :T]


def _causal_terms(k, v, keep, a, c, z0):
    """Stabilised key terms e^{z_j - Z}, e^{z_j - Z} v_j: (B, Tp, 2, F), zero for padded keys and rows.

    k, v: (B, T, F); a, c: (F,); z0: (B, 1, F) max z of earlier keys (-inf: none).
    Also Z (B, 1, F) = max(z0, max real z) and the min of z over real queries (B, 1, F).
    """
    z = a * k + c  # (B, T, F)
    Z = torch.maximum(torch.where(keep, z, -_INF).amax(dim=1, keepdim=True), z0).clamp_min(-1e30)
    zmin = torch.where(keep, z, _INF).amin(dim=1, keepdim=True)
    e = torch.exp(z - Z)  # (B, T, F) <= 1 for real keys
    terms = torch.where(keep.unsqueeze(2), torch.stack((e, e * v), dim=2), 0.0)  # (B, T, 2, F)
    return _pad_rows(terms), Z, zmin


def _causal_output(k, v, P, carry, past, Z, a, c, g, omega, floor):
    """g * head output (B, T, F); past: (B, 1, 2, F) keys before this chunk of tokens, stabilised by Z."""
    T = k.shape[1]
    sums = P[:, :T] + _spread(carry, T) + past  # (B, T, 2, F): over every visible key j < i
    z = a * k + c
    return g * _combine(z, v, sums[:, :, 0], sums[:, :, 1], Z - omega, floor)


def _bidirectional_output(k, v, keep, a, c, g, omega, floor):
    """g * head output with every real key visible: totals minus self."""
    z = a * k + c  # (B, T, F)
    Z = torch.where(keep, z, -_INF).amax(dim=1, keepdim=True).clamp_min(-1e30)  # (B, 1, F)
    e = torch.where(keep, torch.exp(z - Z), 0.0)
    ev = torch.where(keep, e * v, 0.0)
    S = e.sum(dim=1, keepdim=True) - e  # error <= ulp * the query's own denominator
    Q = ev.sum(dim=1, keepdim=True) - ev
    return g * _combine(z, v, S, Q, Z - omega, floor)


def _pair_parts(s, u, eps):
    z = eps * s  # (B, T, F)
    return z, u * (2.0 / eps), torch.cosh(z), torch.sinh(z)  # z, V, cosh z, sinh z


def _pair_key_terms(s, u, keep, eps):
    """Per key: cosh z, sinh z, V cosh z, V sinh z (B, T, 4, F), zero for padded keys; and max |z| of real keys."""
    z, V, ch, sh = _pair_parts(s, u, eps)
    terms = torch.where(keep.unsqueeze(2), torch.stack((ch, sh, V * ch, V * sh), dim=2), 0.0)
    return terms, torch.where(keep, z.abs(), 0.0).amax()


def _pair_terms(s, u, keep, eps):
    """Causal pair terms padded to (B, Tp, 4, F) and max |z|."""
    terms, zmax = _pair_key_terms(s, u, keep, eps)
    return _pad_rows(terms), zmax


def _pair_combine(s, u, eps, sums, n):
    """Sum of the +eps and -eps heads; sums: (B, T, 4, F) over the other visible keys; n = e^-omega."""
    z, V, ch, sh = _pair_parts(s, u, eps)
    C, S, A, B = sums.unbind(dim=2)  # (B, T, F) each
    ez = torch.exp(z)
    den = (ez + 1.0 + n * (C + S)) * (1.0 / ez + 1.0 + n * (C - S))
    self_part = 2.0 * sh + 2.0 * n * (sh * C - ch * S)
    cross = 2.0 * n * (ch * B - sh * A + B + n * (B * C - A * S))
    return (V * self_part + cross) / den


def _pair_causal_output(s, u, eps, P, carry, past, n):
    T = s.shape[1]
    return _pair_combine(s, u, eps, P[:, :T] + _spread(carry, T) + past, n)


def _pair_bidirectional_output(s, u, keep, eps, n):
    terms, zmax = _pair_key_terms(s, u, keep, eps)
    return _pair_combine(s, u, eps, terms.sum(dim=1, keepdim=True) - terms, n), zmax


_causal_terms_k = _Kernel(_causal_terms)
_causal_output_k = _Kernel(_causal_output)
_bidirectional_output_k = _Kernel(_bidirectional_output)
_pair_terms_k = _Kernel(_pair_terms)
_pair_causal_output_k = _Kernel(_pair_causal_output)
_pair_bidirectional_output_k = _Kernel(_pair_bidirectional_output)


# --- prefix sums ----------------------------------------------------------------------

def _strict_lower(n, like):
    return torch.ones(n, n, dtype=like.dtype, device=like.device).tril(-1)  # (n, n)


def chunk_prefix_sums(x):
    """x (B, Tp, W), Tp a multiple of CHUNK -> P (B, Tp, W): sums over the earlier rows of the same
    chunk; carry (B, Tp / CHUNK, W): sums over the earlier chunks; total (B, W).

    One batched GEMM with a CHUNK x CHUNK strictly lower-triangular matrix, then the same on the
    chunk totals (1/CHUNK as many rows): a few large ops rather than O(sqrt T) small ones (aten's
    cumsum over a middle dim is ~5x slower on CPU, and many small parallel ops stall when the
    machine is shared). Every sum is a few short fp32 dot products deep.
    """
    B, Tp, W = x.shape
    assert Tp % CHUNK == 0, (Tp, CHUNK)
    xc = x.view(B, Tp // CHUNK, CHUNK, W)
    P = torch.matmul(_strict_lower(CHUNK, x), xc)  # (B, nC, CHUNK, W)
    sums = P[:, :, -1] + xc[:, :, -1]  # (B, nC, W) chunk totals
    carry = exclusive_prefix_sum(sums)
    return P.view(B, Tp, W), carry, carry[:, -1] + sums[:, -1]


def exclusive_prefix_sum(x):
    """(B, T, W) -> (B, T, W): row t holds the sum of rows j < t."""
    B, T, W = x.shape
    if T <= CHUNK:
        return torch.matmul(_strict_lower(T, x), x)
    P, carry, _ = chunk_prefix_sums(_pad_rows(x))
    return (P + _spread(carry, P.shape[1]))[:, :T]


# --- exact fallback for causal columns whose stabiliser could drop mass ----------------

def _exact_causal(z, v, keep, omega, floor, init):
    """float64 log-space causal head output for n columns. z, v, keep: (n, T); init: (z0, S0, Q0), (n,) each."""
    n = z.shape[0]
    w = torch.where(keep, z - omega, -_INF)  # (n, T) log weight of each key for later queries
    z0, S0, Q0 = (t.view(n, 1) for t in init)
    past = (z0 - omega + S0.log(), z0 - omega + Q0.clamp_min(0).log(), z0 - omega + (-Q0).clamp_min(0).log())

    def log_prefix(first, logs):  # log sum over the past and keys j < i: (n, T)
        return torch.logcumsumexp(torch.cat((first, logs[:, :-1]), dim=1), dim=1)

    log_den = log_prefix(past[0], w)
    log_pos = log_prefix(past[1], w + v.clamp_min(0).log())
    log_neg = log_prefix(past[2], w + (-v).clamp_min(0).log())
    s = torch.maximum(z.clamp_min(floor), log_den)
    self_w = torch.exp(z - s)
    den = self_w + torch.exp(floor - s) + torch.exp(log_den - s)
    return (self_w * v + torch.exp(log_pos - s) - torch.exp(log_neg - s)) / den



def _repair_unsafe(y, k, v, keep, a, c, g, omega, floor, init, Z, zmin, n_keys):
    """Recompute exactly (float64) the columns of g * head output y (B, T, F) where
    n e^{Z - omega - min F - 87} is not negligible; init: (z0, S0, Q0) float64 (B, 1, F)."""
    f_min = torch.maximum(zmin, floor)  # (B, 1, F) over real queries
    unsafe = (Z - omega - f_min + math.log(n_keys) > _span_limit(y.dtype)).view(Z.shape[0], Z.shape[2])
    if not bool(unsafe.any()):
        return y
    b, f = unsafe.nonzero(as_tuple=True)  # (n,) each
    v64 = v[b, :, f].double()  # (n, T)
    z = a.double()[f, None] * k[b, :, f].double() + c.double()[f, None]
    cols = tuple(t[b, 0, f] for t in init)
    exact = _exact_causal(z, v64, keep[b, :, 0], omega, float(floor), cols)
    y[b, :, f] = (g[f, None] * exact).to(y.dtype)
    return y


# --- head groups ------------------------------------------------------------------------

class _GroupState:
    """Per head (m, b, k), float64: z0 = max z of the past real keys, S0 = sum e^{z_j - z0},
    Q0 = sum e^{z_j - z0} v_j; each (M, B, 1, F). n = keys seen."""

    def __init__(self, M, B, F, device):
        self.z0 = torch.full((M, B, 1, F), -_INF, dtype=torch.float64, device=device)
        self.S0 = torch.zeros(M, B, 1, F, dtype=torch.float64, device=device)
        self.Q0 = torch.zeros_like(self.S0)
        self.n = 0


def _keep(key_padding_mask, B, T, device):
    if key_padding_mask is None:
        return torch.ones(B, T, 1, dtype=torch.bool, device=device)
    assert key_padding_mask.shape == (B, T), (tuple(key_padding_mask.shape), B, T)
    return key_padding_mask.to(device=device, dtype=torch.bool).reshape(B, T, 1)


def _causal_head(k, v, keep, a, c, g, omega, floor, state, m):
    """g * causal output (B, T, F) of head m; with a state, past keys count and the state absorbs this chunk."""
    B, T, F = k.shape
    z0 = k.new_full((B, 1, F), -_INF) if state is None else state.z0[m].to(k.dtype)
    terms, Z, zmin = _causal_terms_k(k, v, keep, a[m], c[m], z0)
    P, carry, total = chunk_prefix_sums(terms.view(B, -1, 2 * F))
    if state is None:
        past64 = torch.zeros(B, 1, 2, F, dtype=torch.float64, device=k.device)
        init = (z0.double(), past64[:, :, 0], past64[:, :, 1])
    else:
        init = (state.z0[m], state.S0[m], state.Q0[m])
        scale = torch.exp(state.z0[m] - Z.double())  # (B, 1, F) <= 1: past sums restabilised to Z
        past64 = torch.stack((state.S0[m] * scale, state.Q0[m] * scale), dim=2)  # (B, 1, 2, F)
    omega_t, floor_t = _scalar(omega, k), _scalar(floor, k)
    y = _causal_output_k(k, v, P.view(B, -1, 2, F), carry.view(B, -1, 2, F), past64.to(k.dtype), Z,
                         a[m], c[m], g[m], omega_t, floor_t)
    n_keys = T + (0 if state is None else state.n)
    y = _repair_unsafe(y, k, v, keep, a[m], c[m], g[m], omega, floor_t, init, Z, zmin, n_keys)
    if state is not None:
        total = past64 + total.view(B, 1, 2, F).double()  # (B, 1, 2, F): all keys so far, stabilised by Z
        state.z0[m], state.S0[m], state.Q0[m] = Z.double(), total[:, :, 0], total[:, :, 1]
    return y


def _causal_group(k, v, keep, a, c, g, omega, null_slot, state):
    """sum_m g_m * head_m (B, T, F), causal."""
    floor = 0.0 if null_slot else -_INF
    out = None
    for m in range(a.shape[0]):
        y = _causal_head(k, v, keep, a, c, g, omega, floor, state, m)
        out = y if out is None else out.add_(y)
    if state is not None:
        state.n += k.shape[1]
    return out


def _check_group_args(keys_in, values_in, a, c, g, omega):
    B, T, F = keys_in.shape
    assert values_in.shape == (B, T, F), (tuple(values_in.shape), tuple(keys_in.shape))
    assert a.dim() == 2 and a.shape[1] == F and a.shape == c.shape == g.shape, (a.shape, c.shape, g.shape, F)
    assert omega >= 0, f"omega must be >= 0, got {omega}"


def _group_inputs(keys_in, values_in, a, c, g):
    dtype = _work_dtype(keys_in.dtype)
    k, v = keys_in.to(dtype).contiguous(), values_in.to(dtype).contiguous()
    return (k, v) + tuple(t.to(device=k.device, dtype=dtype) for t in (a, c, g))


@torch.no_grad()
def fast_head_group(keys_in, values_in, a, c, g, omega, *, causal, key_padding_mask=None, null_slot=True):
    """Same as heads.dense_head_group in O(T) per head: keys_in, values_in (B, T, F); a, c, g (M, F) -> (B, T, F)."""
    omega = float(omega)
    _check_group_args(keys_in, values_in, a, c, g, omega)
    B, T, F = keys_in.shape
    k, v, a, c, g = _group_inputs(keys_in, values_in, a, c, g)
    keep = _keep(key_padding_mask, B, T, k.device)
    if causal:
        out = _causal_group(k, v, keep, a, c, g, omega, null_slot, None)
    else:
        omega_t, floor_t = _scalar(omega, k), _scalar(0.0 if null_slot else -_INF, k)
        out = None
        for m in range(a.shape[0]):
            y = _bidirectional_output_k(k, v, keep, a[m], c[m], g[m], omega_t, floor_t)
            out = y if out is None else out.add_(y)
    return out.to(keys_in.dtype)


class HeadGroupCache:
    """Incremental causal decoding of one head group, O(M B F) float64 state whatever the length.

    step(keys, values) takes the next T >= 1 tokens (B, T, F) and returns (B, T, F): what the
    full causal evaluation of the whole sequence gives at those positions.
    """

    def __init__(self, a, c, g, omega, *, null_slot=True):
        assert a.dim() == 2 and a.shape == c.shape == g.shape and omega >= 0
        self.a, self.c, self.g, self.omega, self.null_slot = a, c, g, float(omega), null_slot
        self.state = None

    @torch.no_grad()
    def step(self, keys_t, values_t, key_padding_mask=None):
        _check_group_args(keys_t, values_t, self.a, self.c, self.g, self.omega)
        B, T, F = keys_t.shape
        k, v, a, c, g = _group_inputs(keys_t, values_t, self.a, self.c, self.g)
        if self.state is None:
            self.state = _GroupState(a.shape[0], B, F, k.device)
        assert self.state.z0.shape[1] == B, "batch size changed under a cache"
        keep = _keep(key_padding_mask, B, T, k.device)
        return _causal_group(k, v, keep, a, c, g, self.omega, self.null_slot, self.state).to(keys_t.dtype)


# --- product pairs ------------------------------------------------------------------------

def _check_pair_args(s, u, eps, omega):
    B, T, F = s.shape
    assert u.shape == (B, T, F) and eps.shape == (F,), (tuple(s.shape), tuple(u.shape), tuple(eps.shape))
    assert omega >= 0, f"omega must be >= 0, got {omega}"
    assert bool((eps != 0).all()), "product pairs need eps != 0"


def _pairs_in(dtype, s, u, eps, keep, causal, omega, past64):
    """(out (B, T, F), this chunk's causal totals (B, 1, 4, F) or None, max |eps s|) computed in dtype."""
    B, T, F = s.shape
    s, u, eps = (t.to(dtype).contiguous() for t in (s, u, eps))
    n = _scalar(math.exp(-omega), s)
    if not causal:
        out, zmax = _pair_bidirectional_output_k(s, u, keep, eps, n)
        return out, None, float(zmax)
    terms, zmax = _pair_terms_k(s, u, keep, eps)
    P, carry, total = chunk_prefix_sums(terms.view(B, -1, 4 * F))
    out = _pair_causal_output_k(s, u, eps, P.view(B, -1, 4, F), carry.view(B, -1, 4, F), past64.to(dtype), n)
    return out, total.view(B, 1, 4, F), float(zmax)


def _pairs(s, u, eps, omega, keep, causal, past64, zmax_past=0.0):
    """(out, causal totals, max |z| of all keys so far): fp32 while max |eps s| <= 0.5, else fp64."""
    eps = eps.to(s.device)
    out, total, zmax = _pairs_in(_work_dtype(s.dtype), s, u, eps, keep, causal, omega, past64)
    zmax = max(zmax, zmax_past)
    if zmax > _PAIR_Z_FP32 and out.dtype != torch.float64:
        out, total, _ = _pairs_in(torch.float64, s, u, eps, keep, causal, omega, past64)
    assert zmax <= _PAIR_Z_MAX, f"product pair keys reach |eps s| = {zmax:.3g}: eps or s far out of range"
    if zmax > _PAIR_Z_FP64:
        warnings.warn(f"fastpath: product pair keys reach |eps s| = {zmax:.3g}; accuracy degrades as e^(2|eps s|)")
    return out, total, zmax


@torch.no_grad()
def fast_product_pairs(s, u, eps, omega, *, causal, key_padding_mask=None):
    """Same as heads.dense_product_pairs in O(T): s, u (B, T, F); eps (F,) -> (B, T, F)."""
    omega = float(omega)
    _check_pair_args(s, u, eps, omega)
    B, T, F = s.shape
    past64 = torch.zeros(B, 1, 4, F, dtype=torch.float64, device=s.device)
    out, _, _ = _pairs(s, u, eps, omega, _keep(key_padding_mask, B, T, s.device), causal, past64)
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
        keep = _keep(key_padding_mask, B, T, s_t.device)
        out, total, self.zmax = _pairs(s_t, u_t, self.eps, self.omega, keep, True, self.sums, self.zmax)
        self.sums = self.sums + total.double()
        return out.to(s_t.dtype)
