"""Exact O(n) evaluation of neuron-head groups (docs/DESIGN.md §2, §5).

The same softmax attention as `heads.py`, leakage included, without the T x T scores.
A head's query is the constant 1, so for query i the softmax over {self, null, other
visible keys j} only needs sums over the visible keys. Factoring e^omega out of every
score exactly (omega is never added to a score in floating point), the weights are

    self  e^{z_i}        null  1        other visible key j  e^{z_j - omega}

    out_i = (e^{z_i} v_i + e^{-omega} Q_i) / (e^{z_i} + 1 + e^{-omega} S_i)
    S_i = sum_{j visible, j != i} e^{z_j},  Q_i = sum_{j visible, j != i} e^{z_j} v_j

S and Q are prefix sums over j < i (causal) or totals minus self (bidirectional).

Stabilisation. Per column (b, m, k), Z = max_j z_j over the real keys (from the column
max/min of the keys: z is monotone in them) and the sums hold e^{z_j - Z} <= 1. Then,
with zw = Z - omega (so the other keys weigh e^{zw} e^{z_j - Z}),

    null slot:  out_i = (sigma(z_i) v_i + r_i Q_i) / (1 + r_i S_i),  r_i = e^{zw} sigma(-z_i)
    none:       out_i = (v_i + r_i Q_i) / (1 + r_i S_i),             r_i = e^{zw - z_i}

Every factor is a sigmoid (taken from the keys' own terms e^{z - Z} where that is exact) or
an exponential of a bounded argument, the denominator is >= 1, and omega = 1e6 with
|z| = 1e5 neither overflows nor cancels. This form needs
e^{zw} n (resp. e^{zw - min z} n) to stay below e^80, i.e. leakage below e^80 times the
self weight; a head past that (a broken Omega) takes the stabilised general form
(`_combine_general`), per head.

Exponent arguments are clamped at -60 (fp32; -600 fp64): an exp that underflows runs ~10x
slower on x86 CPUs, and e^-60 of a key's weight is far below rounding. The clamp (like the
per-column Z) perturbs the sums by at most n e^{Z - omega - 60}. Bidirectionally every query sees the
max key, whose weight is e^{zw}, so that is < n e^-60 of every denominator. A causal query
before its column's max key can have a denominator as small as e^{min F} (F_i = max(z_i, 0)
with a null slot, z_i without): where n e^{Z - omega - min F - 60} exceeds e^-25 (leakage
e^35 times the self weight: a broken Omega), the columns concerned are recomputed exactly
in float64 log-space (`_exact_causal`). Calibrated layers never take either fallback.

Negligible leakage. Where 2 n e^{Z - omega} <= e^NEGLIGIBLE_LEAK for every head and column (the
converter's Omega puts calibrated inputs there), the other keys cannot move a denominator (>= 1)
by half an ulp: the group is sum_m g_m sigma(z_i) v_i (no null slot: v_i), a few in-place passes
per head (`_self_only_group`; product pairs likewise, in fastpath_pairs).
Causal caches (generation) keep the running sums and take the full form.

Product pairs (DESIGN.md §4): `fastpath_pairs.py`, on the same prefix sums and blocks.

Work goes block by block of ~2^19 / (B T) units (cache-sized workspaces, reused by all
heads and blocks: no temporaries, no fresh pages). Per head and block: one pass writes the
key terms, causal prefix sums are chunked triangular GEMMs (`chunk_prefix_sums`),
bidirectional totals one aten sum, and ~10 in-place passes combine. No torch.compile: an
inductor-compiled version of these steps measured the same ratios to a GELU FFN on a 2-core
CPU (1.23x at M = 1, 2.5x at M = 6, T = 1024, F = 3072), for 10-20 s of compilation per shape
variant and a C++ toolchain that the worker images lack.
Inference only: the public functions run under torch.no_grad().
"""
import math
from abc import ABC, abstractmethod

import torch

CHUNK = 8  # rows per chunk of the causal prefix sums
# Other keys whose summed weight is below e^-60 of a softmax denominator (>= 1 here) move it by
# less than half an ulp in float32 and float64 (2^-24 = e^-16.6, 2^-53 = e^-36.7) and a numerator
# by less than e^-60 max |v|: where every column's bound shows that, a group is evaluated from
# each query's self and null slot alone (the same standard as the exponent floor below).
NEGLIGIBLE_LEAK = -60.0
SELF_ONLY_BLOCK = 1 << 20  # elements per row block of the self-only evaluation
BLOCK_ELEMENTS = 1 << 19  # B * T * columns per block of units: ~2 MB fp32 workspaces, reused, cache-resident
_INF = float("inf")


def _exp_floor(dtype):
    """Lowest exponent argument used: no denormals, and e^floor is far below rounding."""
    return -600.0 if dtype == torch.float64 else -60.0


def _exp_ceil(dtype):
    """Largest exponent argument whose result times a few thousand still fits the dtype."""
    return 700.0 if dtype == torch.float64 else 80.0


def _span_limit(dtype):
    """Largest Z - omega - min F + ln n for which clamped or flushed terms stay < e^-25 of every denominator."""
    return -_exp_floor(dtype) - 25.0


def work_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


# --- prefix sums and column ranges ------------------------------------------------------

def _strict_lower(n, like):
    return torch.ones(n, n, dtype=like.dtype, device=like.device).tril(-1)  # (n, n)


def chunk_prefix_sums(x, out):
    """In-chunk and cross-chunk prefix sums of x (B, Tp, W), Tp a multiple of CHUNK.

    out (B, Tp, W) receives P: row t holds the sum of the earlier rows of its chunk. Returns
    carry (B, Tp / CHUNK, W), the sums over the earlier chunks, and total (B, W).
    One batched GEMM with a CHUNK x CHUNK strictly lower-triangular matrix, then the same on the
    chunk totals (1/CHUNK as many rows): a few large ops rather than O(sqrt T) small ones (aten's
    cumsum over a middle dim is ~5x slower on CPU, and many small parallel ops stall when the
    machine is shared). Every sum is a few short dot products deep.
    """
    B, Tp, W = x.shape
    assert Tp % CHUNK == 0 and out.shape == x.shape, (tuple(x.shape), tuple(out.shape), CHUNK)
    xc = x.view(B, Tp // CHUNK, CHUNK, W)
    P = torch.matmul(_strict_lower(CHUNK, x), xc, out=out.view(xc.shape))  # (B, nC, CHUNK, W)
    sums = P[:, :, -1] + xc[:, :, -1]  # (B, nC, W) chunk totals
    carry = exclusive_prefix_sum(sums)
    return carry, carry[:, -1] + sums[:, -1]


def exclusive_prefix_sum(x):
    """(B, T, W) -> (B, T, W), a new tensor: row t holds the sum of rows j < t."""
    B, T, W = x.shape
    if T <= CHUNK:
        return torch.matmul(_strict_lower(T, x), x)
    Tp = T + (-T) % CHUNK
    padded = torch.cat((x, x.new_zeros(B, Tp - T, W)), dim=1)
    P = torch.empty_like(padded)
    carry, _ = chunk_prefix_sums(padded, P)
    return add_carry(P, carry)[:, :T]


def add_carry(P, carry):
    """P (B, Tp, ...) += carry (B, Tp / CHUNK, ...) broadcast over each chunk's rows, in place."""
    B, Tp = P.shape[:2]
    P.view(B, Tp // CHUNK, CHUNK, -1).add_(carry.reshape(B, Tp // CHUNK, 1, -1))
    return P


def column_range(x, keep, masked):
    """Max and min over the real rows of x (B, T, F): (B, 1, F) each, -inf / +inf where none."""
    if not masked:
        return x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    return x.masked_fill(~keep, -_INF).amax(dim=1, keepdim=True), x.masked_fill(~keep, _INF).amin(dim=1, keepdim=True)


def _value_range(x, keep, masked):
    """Max and min over the real rows of x (B, T, F), all columns together: 0-dim tensors, one pass
    (cheaper than the per-column ranges, and enough for the leakage bound)."""
    if masked:
        x = x[keep.expand_as(x)]
    if x.numel() == 0:
        return x.new_tensor(-_INF), x.new_tensor(_INF)
    low, high = torch.aminmax(x)
    return high, low


def _key_range(kmax, kmin, a, c):
    """Max and min over the real keys of z = a k + c (B, 1, F), from those of k: z is monotone in k."""
    up = a >= 0
    Z, zmin = a * torch.where(up, kmax, kmin) + c, a * torch.where(up, kmin, kmax) + c
    none = kmax == -_INF  # a column without a real key
    return torch.where(none, -_INF, Z), torch.where(none, _INF, zmin)


# --- one head ----------------------------------------------------------------------------

class _Work:
    """Workspaces for one block of columns, shared by its heads: no temporaries, no fresh pages."""

    def __init__(self, B, T, F, like, rows=2):
        Tp = T + (-T) % CHUNK
        self.z = like.new_empty(B, T, F)
        self.y = like.new_empty(B, T, F)
        self.terms = like.new_empty(B, Tp, rows, F)
        self.terms[:, T:] = 0  # padding rows: keep the chunked sums exact
        self.P = like.new_empty(B, Tp, rows, F)


def column_blocks(B, T, F, like, rows=2):
    """(column slice, workspace) covering the F units in blocks of ~BLOCK_ELEMENTS / (B T) columns."""
    width = max(16, BLOCK_ELEMENTS // (B * T) // 16 * 16)
    works = {}
    for f0 in range(0, F, width):
        cols = slice(f0, min(F, f0 + width))
        w = cols.stop - cols.start
        if w not in works:
            works[w] = _Work(B, T, w, like, rows)
        yield cols, works[w]


def _key_terms(k, v, keep, masked, a, c, Z, zmin, work):
    """work.z = z = a k + c (B, T, F); work.terms[:, :T] = e^{z_j - Z}, e^{z_j - Z} v_j, 0 for padded keys."""
    T = k.shape[1]
    z = torch.addcmul(c, a, k, out=work.z)
    e, ev = work.terms[:, :T, 0], work.terms[:, :T, 1]
    torch.addcmul(c - Z, a, k, out=e)  # z_j - Z <= 0 for real keys
    floor = _exp_floor(k.dtype)
    if masked or float((zmin - Z).min()) < floor:  # else no argument is below the floor
        e.clamp_min_(floor)
    e.exp_()
    torch.mul(e, v, out=ev)
    if masked:
        e.masked_fill_(~keep, 0.0)
        ev.masked_fill_(~keep, 0.0)  # a padded key's value may be inf or nan
    return z


def _fast_form_ok(zw, zmin, n_keys, null_slot, dtype):
    """Whether _combine's leakage factor r S stays finite: e^{zw} n (no null slot: e^{zw - min z} n) < e^ceil."""
    lead = zw if null_slot else zw - zmin
    return float(lead.max()) + math.log(n_keys) <= _exp_ceil(dtype)


def _weights(z, e, Z, zmin, zw, null_slot, work):
    """The fast form's per-query self weight (None: 1) and leakage factor r (B, T, F), in work.y and
    work.z (z is consumed). e: e^{z - Z}, the keys' terms of the same positions.

    Null slot: sigma(z) and e^{zw} sigma(-z), from e as e / (e + e^{-Z}) and e^{-omega} / (e + e^{-Z})
    where that is exact (no real key's term was clamped, e^{-Z} a normal number), else from two
    sigmoids. No null slot: 1 and e^{zw - z}.
    """
    floor, ceil = _exp_floor(z.dtype), _exp_ceil(z.dtype)
    if not null_slot:
        return None, z.neg_().add_(zw).clamp_(floor, ceil).exp_()  # the ceil only binds at padded queries
    ezw = torch.where(zw < floor, 0.0, zw.exp())  # a leakage below e^floor n is dropped: no denormals
    if float((zmin - Z).min()) >= floor and -ceil <= float(Z.min()) and float(Z.max()) <= -floor:
        scale = torch.exp(-Z)  # (B, 1, F)
        den = torch.add(e, scale, out=z)  # e^{-Z} (e^z + 1)
        return torch.div(e, den, out=work.y), den.reciprocal_().mul_(scale * ezw)
    z.clamp_(-ceil, ceil)  # sigmoid(+-ceil) is 1 or ~e^-ceil (negligible); huge |z| is slow in exp
    return torch.sigmoid(z, out=work.y), z.neg_().sigmoid_().mul_(ezw)


def _combine(v, S, Q, self_w, r, out):
    """out = (self_w v + r Q) / (1 + r S), in place (S, Q and self_w are consumed). All (B, T, F).

    S, Q: sums of e^{z_j - Z} and e^{z_j - Z} v_j over the other visible keys.
    """
    den = S.mul_(r).add_(1.0)
    num = Q.mul_(r).add_(v) if self_w is None else self_w.mul_(v).addcmul_(r, Q)
    return torch.div(num, den, out=out)


def _combine_general(z, v, S, Q, zw, floor):
    """The same output for any leakage (a broken Omega): weights relative to e^s, s = max(z, floor, zw),
    so that one of self, null, leak is 1 and none exceeds 1. floor: 0 (null slot) or -inf."""
    low = -_exp_floor(z.dtype)

    def decay(x):  # e^{-x} for x >= 0, 0 past e^-low: underflowing exps are ~10x slower, and e^-low is below rounding
        return torch.where(x > low, 0.0, torch.exp(-x.clamp_max(low)))

    m = z.clamp_min(floor)  # (B, T, F)
    t = decay((z - floor).abs())  # e^{-|z - floor|}: 0 without a null slot
    r = decay((zw - m).abs())
    leak_up = zw > m  # s = zw: the other keys' scale dominates
    rho = torch.where(leak_up, r, 1.0)  # e^{m - s}
    leak = torch.where(leak_up, 1.0, r)  # e^{zw - s}
    self_w = torch.where(z >= floor, rho, t * rho)  # e^{z - s}
    den = (1.0 + t) * rho + leak * S
    return (self_w * v + leak * Q) / den.clamp_min(torch.finfo(den.dtype).tiny)


def _head_output(z, e, v, S, Q, Z, zmin, omega, null_slot, n_keys, work):
    """work.y = the head's output (B, T, F); z, S and Q are consumed."""
    zw = Z - omega
    if _fast_form_ok(zw, zmin, n_keys, null_slot, z.dtype):
        self_w, r = _weights(z, e, Z, zmin, zw, null_slot, work)
        return _combine(v, S, Q, self_w, r, work.y)
    return work.y.copy_(_combine_general(z, v, S, Q, zw, 0.0 if null_slot else -_INF))


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


def _repair_unsafe(y, k, v, keep, a, c, omega, floor, init, Z, zmin, n_keys):
    """Recompute exactly (float64) the columns of head output y (B, T, F) where
    n e^{Z - omega - min F + floor} is not negligible; init: (z0, S0, Q0) float64 (B, 1, F)."""
    f_min = zmin.clamp_min(floor)  # (B, 1, F) over real queries
    unsafe = (Z - omega - f_min + math.log(n_keys) > _span_limit(y.dtype)).view(Z.shape[0], Z.shape[2])
    if not bool(unsafe.any()):
        return y
    b, f = unsafe.nonzero(as_tuple=True)  # (n,) each
    z = a.double()[f, None] * k[b, :, f].double() + c.double()[f, None]  # (n, T)
    cols = tuple(t[b, 0, f] for t in init)
    y[b, :, f] = _exact_causal(z, v[b, :, f].double(), keep[b, :, 0], omega, floor, cols).to(y.dtype)
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


def keep_mask(key_padding_mask, B, T, device):
    """(B, T, 1) bool, True = real key, and whether any key may be padded."""
    if key_padding_mask is None:
        return torch.ones(B, T, 1, dtype=torch.bool, device=device), False
    assert key_padding_mask.shape == (B, T), (tuple(key_padding_mask.shape), B, T)
    return key_padding_mask.to(device=device, dtype=torch.bool).reshape(B, T, 1), True


def _causal_head(k, v, keep, masked, a, c, omega, null_slot, Z, zmin, past, n_past, work):
    """One head's causal output (work.y, (B, T, F)) for one block of columns. a, c: (F,).

    past: None, or this head's float64 state views (z0, S0, Q0), (B, 1, F) each: the earlier
    keys count, and the state absorbs these (updated in place).
    """
    B, T, F = k.shape
    if past is not None:
        Z = torch.maximum(Z, past[0].to(k.dtype))
    Z = Z.clamp_min(-1e30)  # no real key at all: keeps exp(z - Z) and exp(z0 - Z) free of inf - inf
    z = _key_terms(k, v, keep, masked, a, c, Z, zmin, work)
    carry, total = chunk_prefix_sums(work.terms.view(B, -1, 2 * F), work.P.view(B, -1, 2 * F))
    if past is None:
        past64 = torch.zeros(B, 1, 2, F, dtype=torch.float64, device=k.device)
        init = (torch.full_like(past64[:, :, 0], -_INF), past64[:, :, 0], past64[:, :, 1])
    else:
        init = past
        scale = torch.exp(past[0] - Z.double())  # (B, 1, F) <= 1: past sums restabilised to Z
        past64 = torch.stack((past[1] * scale, past[2] * scale), dim=2)  # (B, 1, 2, F)
        carry = carry + past64.view(B, 1, 2 * F).to(k.dtype)
    P = add_carry(work.P, carry)  # (B, Tp, 2, F): sums over every visible key j < i
    n_keys = T + n_past
    y = _head_output(z, work.terms[:, :T, 0], v, P[:, :T, 0], P[:, :T, 1], Z, zmin, omega, null_slot, n_keys, work)
    y = _repair_unsafe(y, k, v, keep, a, c, omega, 0.0 if null_slot else -_INF, init, Z, zmin, n_keys)
    if past is not None:
        total = past64 + total.view(B, 1, 2, F).double()  # (B, 1, 2, F): all keys so far, stabilised by Z
        past[1].copy_(total[:, :, 0])
        past[2].copy_(total[:, :, 1])
        past[0].copy_(Z)
    return y


def _bidirectional_head(k, v, keep, masked, a, c, omega, null_slot, Z, zmin, work):
    """One head's output (work.y, (B, T, F)) for one block of columns, every real key visible."""
    T = k.shape[1]
    Z = Z.clamp_min(-1e30)
    z = _key_terms(k, v, keep, masked, a, c, Z, zmin, work)
    terms = work.terms[:, :T]  # (B, T, 2, F)
    others = torch.sub(terms.sum(dim=1, keepdim=True), terms, out=work.P[:, :T])  # error <= ulp * own denominator
    return _head_output(z, terms[:, :, 0], v, others[:, :, 0], others[:, :, 1], Z, zmin, omega, null_slot, T, work)


def _leak_negligible(kmax, kmin, a, c, omega, null_slot, n_keys):
    """Whether, for every head and column, the other keys' weights summed stay below
    e^NEGLIGIBLE_LEAK of the denominator (>= 1): n e^{Z - omega} with a null slot,
    n e^{Z - omega - min z} without. kmax, kmin: the real inputs' max and min (0-dim: all
    columns; Z is then an upper bound of each column's max key); a, c: (M, F)."""
    Z, zmin = _key_range(kmax, kmin, a, c)  # (M, F)
    lead = Z - omega if null_slot else Z - omega - zmin
    return float(lead.max()) + math.log(2 * n_keys) <= NEGLIGIBLE_LEAK


class _HeadOperands(ABC):
    """Head m's a_m, c_m, g_m in the three in-place passes of `_self_only_group`."""

    g: object

    @abstractmethod
    def key(self, kb, w, m):  # w = c_m + a_m kb
        ...

    def first(self, ob, w, m):  # ob = g_m w
        return torch.mul(w, self.g[m], out=ob)

    @abstractmethod
    def accumulate(self, ob, w, m):  # ob += g_m w
        ...


class _UniformHeads(_HeadOperands):
    """One mixture for every unit (what the converter builds): scalar operands, which aten's CPU
    kernels run ~4x faster than broadcast vectors; one host transfer for all heads."""

    def __init__(self, a, c, g):  # (M, 1) each, or (M, F) with stride 0 along F
        self.a, self.g = torch.stack((a[:, 0], g[:, 0])).tolist()
        self.c = c[:, 0]

    def key(self, kb, w, m):
        return torch.add(self.c[m], kb, alpha=self.a[m], out=w)

    def accumulate(self, ob, w, m):
        return ob.add_(w, alpha=self.g[m])


class _PerUnitHeads(_HeadOperands):
    """Operands as (F,) vectors, one value per unit."""

    def __init__(self, a, c, g):  # (M, F) each
        self.a, self.c, self.g = a, c, g

    def key(self, kb, w, m):
        return torch.addcmul(self.c[m], self.a[m], kb, out=w)

    def accumulate(self, ob, w, m):
        return ob.addcmul_(w, self.g[m])


def _self_only_group(k, v, a, c, g, null_slot):
    """sum_m g_m w_m v (B, T, F), w_m = sigma(a_m k + c_m) with a null slot, 1 without: the heads'
    output when no other key carries weight. Row blocks of ~SELF_ONLY_BLOCK elements; per head
    three in-place passes (key, sigmoid, accumulate) into one reused workspace."""
    if not null_slot:
        return v * g.sum(dim=0)
    B, T, F = k.shape
    kf, vf = k.view(B * T, F), v.view(B * T, F)
    out = torch.empty_like(kf)
    rows = max(1, SELF_ONLY_BLOCK // F)
    work = kf.new_empty(min(rows, B * T), F)
    uniform = all(t.shape[1] == 1 or t.stride(1) == 0 for t in (a, c, g))
    heads = (_UniformHeads if uniform else _PerUnitHeads)(a, c, g)
    for r0 in range(0, B * T, rows):
        kb, ob = kf[r0:r0 + rows], out[r0:r0 + rows]  # (rows, F) views
        w = work[:kb.shape[0]]
        for m in range(a.shape[0]):
            heads.key(kb, w, m).sigmoid_()
            (heads.first if m == 0 else heads.accumulate)(ob, w, m)
        ob.mul_(vf[r0:r0 + rows])
    return out.view(B, T, F)


def _group(k, v, key_padding_mask, a, c, g, omega, null_slot, causal, state=None):
    """sum_m g_m * head_m (B, T, F), block of columns by block of columns."""
    B, T, F = k.shape
    keep, masked = keep_mask(key_padding_mask, B, T, k.device)
    if state is None and _leak_negligible(*_value_range(k, keep, masked), a, c, omega, null_slot, T):
        return _self_only_group(k, v, a, c, g, null_slot)
    kmax, kmin = column_range(k, keep, masked)  # (B, 1, F): shared by the M heads
    n_past = 0 if state is None else state.n
    out = torch.empty_like(k)
    for cols, work in column_blocks(B, T, F, k):
        kb, vb, ob = k[:, :, cols], v[:, :, cols], out[:, :, cols]  # (B, T, w) views
        for m in range(a.shape[0]):
            am, cm = a[m, cols], c[m, cols]  # (w,)
            Z, zmin = _key_range(kmax[:, :, cols], kmin[:, :, cols], am, cm)
            if causal:
                past = None if state is None else tuple(t[m, :, :, cols] for t in (state.z0, state.S0, state.Q0))
                y = _causal_head(kb, vb, keep, masked, am, cm, omega, null_slot, Z, zmin, past, n_past, work)
            else:
                y = _bidirectional_head(kb, vb, keep, masked, am, cm, omega, null_slot, Z, zmin, work)
            if m == 0:
                torch.mul(y, g[m, cols], out=ob)
            else:
                ob.addcmul_(y, g[m, cols])
    if state is not None:
        state.n += T
    return out


def _group_token(k, v, real, a, c, g, omega, floor, state):
    """One new token for all M heads at once from the running sums, float64: k, v (B, 1, F); real (B,).

    Exact without a fallback: S0 >= 1 once a key is in (z0 is the running max), so with
    s = max(z, floor, z0 - omega) the denominator is >= 1.
    """
    z = a[:, None, None, :] * k + c[:, None, None, :]  # (M, B, 1, F)
    zw = state.z0 - omega
    s = torch.maximum(z.clamp_min(floor), zw)
    self_w, leak = torch.exp(z - s), torch.exp(zw - s)
    den = self_w + torch.exp(floor - s) + leak * state.S0
    out = (g[:, None, None, :] * (self_w * v + leak * state.Q0) / den).sum(dim=0)  # (B, 1, F)
    z_new = torch.maximum(state.z0, z)
    scale, e = torch.exp(state.z0 - z_new), torch.exp(z - z_new)
    upd = real.view(1, -1, 1, 1)
    state.S0 = torch.where(upd, state.S0 * scale + e, state.S0)
    state.Q0 = torch.where(upd, state.Q0 * scale + e * v, state.Q0)
    state.z0 = torch.where(upd, z_new, state.z0)
    state.n += 1
    return out


def _check_group_args(keys_in, values_in, a, c, g, omega):
    B, T, F = keys_in.shape
    assert T >= 1 and values_in.shape == (B, T, F), (tuple(values_in.shape), tuple(keys_in.shape))
    assert a.dim() == 2 and a.shape[1] == F and a.shape == c.shape == g.shape, (a.shape, c.shape, g.shape, F)
    assert omega >= 0, f"omega must be >= 0, got {omega}"


def _group_inputs(keys_in, values_in, a, c, g):
    dtype = work_dtype(keys_in.dtype)
    k, v = keys_in.to(dtype).contiguous(), values_in.to(dtype).contiguous()
    return (k, v) + tuple(t.to(device=k.device, dtype=dtype) for t in (a, c, g))


@torch.no_grad()
def fast_head_group(keys_in, values_in, a, c, g, omega, *, causal, key_padding_mask=None, null_slot=True):
    """Same as heads.dense_head_group in O(T) per head: keys_in, values_in (B, T, F); a, c, g (M, F) -> (B, T, F)."""
    omega = float(omega)
    _check_group_args(keys_in, values_in, a, c, g, omega)
    k, v, a, c, g = _group_inputs(keys_in, values_in, a, c, g)
    return _group(k, v, key_padding_mask, a, c, g, omega, null_slot, causal).to(keys_in.dtype)


class HeadGroupCache:
    """Incremental causal decoding of one head group, O(M B F) float64 state whatever the length.

    step(keys, values) takes the next T >= 1 tokens (B, T, F) and returns (B, T, F): what the
    full causal evaluation of the whole sequence gives at those positions. A prompt can go in
    as one chunk; single tokens take a ~20-op float64 path.
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
        if T == 1:
            real = keep_mask(key_padding_mask, B, T, k.device)[0].view(B)
            floor = 0.0 if self.null_slot else -_INF
            out = _group_token(*(t.double() for t in (k, v)), real, *(t.double() for t in (a, c, g)),
                               self.omega, floor, self.state)
        else:
            out = _group(k, v, key_padding_mask, a, c, g, self.omega, self.null_slot, True, self.state)
        return out.to(keys_t.dtype)
