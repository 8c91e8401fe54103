"""The O(n) fast path against the dense softmax-attention reference.

The fast path runs in float32, the reference in float64 on the same (float32-representable)
inputs; errors are max |fast - ref| over real query positions relative to max |ref| there.
"""
import math

import pytest
import torch
import torch.nn.functional as Fn

from shared.conversion import fastpath, fastpath_pairs
from shared.conversion.heads import dense_head_group, dense_product_pairs, product_pair_heads

TOL = 1e-6  # issue 5: fast (fp32) vs dense (fp64) relative error
LENGTHS = [1, 2, 7, 64, 300]


def rel_err(fast, ref, mask=None):
    """max |fast - ref| / max |ref| over real positions (outputs at padded queries carry no meaning)."""
    real = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask
    diff = (fast.double() - ref)[real]
    return (diff.abs().max() / ref[real].abs().max()).item()


def padding(B, T, causal, gen):
    """Row 0 unpadded, row 1 left-padded (decoder batches) or right-padded (encoder batches)."""
    mask = torch.ones(B, T, dtype=torch.bool)
    n_pad = int(torch.randint(0, max(1, T // 2) + 1, (1,), generator=gen))
    if T > 1 and n_pad:
        if causal:
            mask[1, :n_pad] = False
        else:
            mask[1, T - n_pad:] = False
    return mask


def group_case(kind, B, T, F, gen):
    """(keys, values, a, c, g, omega, null_slot) of the head-group kinds the converter builds."""
    u = torch.randn(B, T, F, generator=gen) * 2
    if kind == "silu":
        one = torch.ones(1, F)
        return u, u, one, torch.zeros(1, F), one, 30.0, True
    if kind == "gelu_mixture":
        M = 4
        a = torch.rand(M, F, generator=gen) * 2.5 + 0.5  # [0.5, 3]
        c = torch.rand(M, F, generator=gen) * 4 - 2  # [-2, 2]
        g = torch.randn(M, F, generator=gen)
        return u, u, a, c, g, 40.0, True
    if kind == "identity":
        s = torch.randn(B, T, F, generator=gen)
        zero = torch.zeros(1, F)
        return s, s, zero, zero, -torch.ones(1, F), 20.0, False
    raise AssertionError(kind)


CHUNKS = [5, 1, 1, 3, 1, 20, 1, 1]  # cache steps: a prompt, single tokens, short chunks: 33 tokens


def chunked(step, *tensors):
    """Feed (B, 33, ...) tensors to a cache's step() in CHUNKS and concatenate what it returns."""
    out, start = [], 0
    for n in CHUNKS:
        out.append(step(*(t[:, start:start + n] for t in tensors)))
        start += n
    return torch.cat(out, dim=1)


def both(keys, values, a, c, g, omega, *, causal, mask, null_slot):
    fast = fastpath.fast_head_group(keys, values, a, c, g, omega, causal=causal, key_padding_mask=mask,
                                    null_slot=null_slot)
    ref = dense_head_group(keys.double(), values.double(), a.double(), c.double(), g.double(), omega,
                           causal=causal, key_padding_mask=mask, null_slot=null_slot)
    assert fast.dtype == keys.dtype and fast.shape == ref.shape
    assert torch.isfinite(fast).all(), "outputs must be finite everywhere, padded queries included"
    return fast, ref


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("kind", ["silu", "gelu_mixture", "identity"])
def test_head_group_matches_dense(kind, padded, causal, T):
    gen = torch.Generator().manual_seed(T * 7 + causal)
    B, F = 2, 12
    keys, values, a, c, g, omega, null_slot = group_case(kind, B, T, F, gen)
    mask = padding(B, T, causal, gen) if padded else None
    fast, ref = both(keys, values, a, c, g, omega, causal=causal, mask=mask, null_slot=null_slot)
    assert rel_err(fast, ref, mask) <= TOL


def no_leak(keys, values, a, c, g, null_slot):
    """What the group gives if only self and null counted: sum_m g u sigmoid(z) (identity: the value)."""
    z = a.double() * keys.double().unsqueeze(2) + c.double()  # (B, T, M, F)
    weight = torch.sigmoid(z) if null_slot else torch.ones_like(z)
    return (g.double() * weight * values.double().unsqueeze(2)).sum(2)


@pytest.mark.parametrize("T", [7, 64, 300])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("null_slot", [True, False], ids=["null", "nonull"])
@pytest.mark.parametrize("M", [1, 4])
def test_leakage_is_modelled(M, null_slot, causal, T):
    """omega = 2: the other keys take a large share of the softmax, and the fast path still agrees."""
    gen = torch.Generator().manual_seed(100 + T + M)
    B, F = 2, 10
    keys = torch.randn(B, T, F, generator=gen) * 2
    values = torch.randn(B, T, F, generator=gen)
    a = torch.rand(M, F, generator=gen) * 2.5 + 0.5
    c = torch.rand(M, F, generator=gen) * 4 - 2
    g = torch.randn(M, F, generator=gen)
    mask = padding(B, T, causal, gen)
    fast, ref = both(keys, values, a, c, g, 2.0, causal=causal, mask=mask, null_slot=null_slot)
    assert rel_err(no_leak(keys, values, a, c, g, null_slot).to(ref), ref, mask) > 0.05, "leakage must matter here"
    assert rel_err(fast, ref, mask) <= TOL


@pytest.mark.parametrize("omega", [3e5, 1e6])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_relu_huge_gain(causal, omega):
    """a = 1e5 and omega up to 1e6: scores never formed as omega + z, so nothing overflows or cancels."""
    gen = torch.Generator().manual_seed(5)
    B, T, F = 2, 300, 16
    u = torch.rand(B, T, F, generator=gen) * 4 - 2  # |a u| <= 2e5 < omega
    u[:, ::3] *= 1e-5  # a third of the inputs inside the sigmoid's transition, |a u| ~ 1
    one = torch.ones(1, F)
    mask = padding(B, T, causal, gen)
    fast, ref = both(u, u, 1e5 * one, 0 * one, one, omega, causal=causal, mask=mask, null_slot=True)
    assert rel_err(fast, ref, mask) <= TOL
    assert (ref - torch.relu(u.double())).abs().max() <= 0.28 / 1e5  # and it is a ReLU


def test_unsafe_causal_columns_are_recomputed_exactly(monkeypatch):
    """Leaky keys (z - omega ~ 10..20) before one huge key (z = 200): with the per-column
    stabiliser Z = 200 the early keys' terms e^{z - Z} ~ e^-135 sit at the e^-60 clamp, which
    the queries before the big key would see; those columns must be detected and recomputed."""
    gen = torch.Generator().manual_seed(9)
    B, T, F = 1, 64, 6
    keys = 60 + 10 * torch.rand(B, T, F, generator=gen)
    keys[:, 40, :3] = 200.0  # columns 0..2 are unsafe, 3..5 safe
    values = torch.randn(B, T, F, generator=gen)
    one = torch.ones(1, F)
    args = (keys, values, one, 0 * one, one, 50.0)
    fast, ref = both(*args, causal=True, mask=None, null_slot=True)
    assert rel_err(fast, ref) <= TOL
    monkeypatch.setattr(fastpath, "_span_limit", lambda dtype: math.inf)  # no repair: the flushed keys show
    unrepaired = fastpath.fast_head_group(*args, causal=True)
    assert rel_err(unrepaired[..., :3], ref[..., :3]) > 1e-2
    assert rel_err(unrepaired[..., 3:], ref[..., 3:]) <= TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_broken_omega_takes_the_general_form(causal):
    """Leakage beyond e^80 times the self weight (keys 200 above omega): the sigmoid form would
    overflow, the stabilised general form (and, causally, the exact fallback) takes over."""
    gen = torch.Generator().manual_seed(14)
    B, T, F = 2, 40, 6
    keys = 30 * torch.randn(B, T, F, generator=gen)
    keys[:, 25, :] = 250.0
    values = torch.randn(B, T, F, generator=gen)
    one = torch.ones(1, F)
    mask = padding(B, T, causal, gen)
    for null_slot in (True, False):
        fast, ref = both(keys, values, one, 0 * one, one, 50.0, causal=causal, mask=mask, null_slot=null_slot)
        assert rel_err(fast, ref, mask) <= TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_column_blocks(monkeypatch, causal):
    """Units are processed in blocks of columns (16 here: 16, 16, 8): every block, the narrower
    last one included, and the cache's state slices must line up."""
    monkeypatch.setattr(fastpath, "BLOCK_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(15)
    B, T, F = 2, 33, 40
    keys, values, a, c, g, _, _ = group_case("gelu_mixture", B, T, F, gen)
    mask = padding(B, T, causal, gen)
    fast, ref = both(keys, values, a, c, g, 2.0, causal=causal, mask=mask, null_slot=True)
    assert rel_err(fast, ref, mask) <= TOL
    eps = torch.full((F,), 1e-4)
    pairs = fastpath_pairs.fast_product_pairs(keys, values, eps, 2.0, causal=causal, key_padding_mask=mask)
    ref = dense_product_pairs(keys.double(), values.double(), eps.double(), 2.0, causal=causal, key_padding_mask=mask)
    assert rel_err(pairs, ref, mask) <= TOL
    if causal:
        cache = fastpath.HeadGroupCache(a, c, g, 2.0)
        _, ref = both(keys, values, a, c, g, 2.0, causal=True, mask=None, null_slot=True)
        assert rel_err(chunked(cache.step, keys, values), ref) <= TOL
        pair_cache = fastpath_pairs.ProductPairsCache(eps, 2.0)
        ref = dense_product_pairs(keys.double(), values.double(), eps.double(), 2.0, causal=True)
        assert rel_err(chunked(pair_cache.step, keys, values), ref) <= TOL


@pytest.mark.parametrize("eps", [1e-4, 1e-6])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("omega", [2.0, 30.0], ids=["leaky", "calibrated"])
def test_product_pairs_match_dense(omega, causal, T, eps):
    gen = torch.Generator().manual_seed(T + int(omega))
    B, F = 2, 12
    s = torch.randn(B, T, F, generator=gen) * 3
    u = torch.randn(B, T, F, generator=gen)
    eps_t = torch.full((F,), eps)
    mask = padding(B, T, causal, gen)
    fast = fastpath_pairs.fast_product_pairs(s, u, eps_t, omega, causal=causal, key_padding_mask=mask)
    ref = dense_product_pairs(s.double(), u.double(), eps_t.double(), omega, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(fast).all()
    err = rel_err(fast, ref, mask)
    assert err <= TOL, err  # measured ~1e-7 to 3e-7
    if omega == 30.0:  # calibrated: the pair is the product s u up to (eps s)^2 / 12
        assert rel_err(ref, s.double() * u.double(), mask) <= 1e-6


def test_product_pairs_beat_separate_heads():
    """Evaluating the two heads separately in fp32 cancels catastrophically; the identity does not."""
    gen = torch.Generator().manual_seed(3)
    B, T, F = 2, 64, 12
    s, u = torch.randn(B, T, F, generator=gen) * 3, torch.randn(B, T, F, generator=gen)
    eps = torch.full((F,), 1e-4)
    ref = dense_product_pairs(s.double(), u.double(), eps.double(), 2.0, causal=True)
    a, c, g = product_pair_heads(eps)
    separate = fastpath.fast_head_group(s, u, a, c, g, 2.0, causal=True)
    paired = fastpath_pairs.fast_product_pairs(s, u, eps, 2.0, causal=True)
    assert rel_err(separate, ref) > 1e-5
    assert rel_err(paired, ref) <= TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_product_pairs_with_large_keys_use_float64(monkeypatch, causal):
    """|eps s| > 0.5: the identity's sums (C - S = sum e^{-z_j}) cancel in fp32; fp64 is used instead."""
    gen = torch.Generator().manual_seed(4)
    B, T, F = 2, 32, 4
    s, u = 20 + 10 * torch.rand(B, T, F, generator=gen), torch.randn(B, T, F, generator=gen)
    eps = torch.full((F,), 0.2)  # eps s in [4, 6]: C ~ S ~ e^6, C - S ~ e^-4
    mask = padding(B, T, causal, gen)
    fast = fastpath_pairs.fast_product_pairs(s, u, eps, 2.0, causal=causal, key_padding_mask=mask)
    ref = dense_product_pairs(s.double(), u.double(), eps.double(), 2.0, causal=causal, key_padding_mask=mask)
    assert rel_err(fast, ref, mask) <= TOL
    monkeypatch.setattr(fastpath_pairs, "_PAIR_Z_FP32", math.inf)  # the same inputs forced through fp32 show why
    forced = fastpath_pairs.fast_product_pairs(s, u, eps, 2.0, causal=causal, key_padding_mask=mask)
    assert rel_err(forced, ref, mask) > TOL


def test_product_pairs_out_of_range_warn():
    s, u = torch.full((1, 4, 2), 30.0), torch.ones(1, 4, 2)
    with pytest.warns(UserWarning, match="accuracy degrades"):
        out = fastpath_pairs.fast_product_pairs(s, u, torch.ones(2), 2.0, causal=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_float64_inputs_stay_float64(causal):
    gen = torch.Generator().manual_seed(6)
    keys, values, a, c, g, _, _ = group_case("gelu_mixture", 2, 50, 8, gen)
    keys, values = keys.double(), values.double()
    fast, ref = both(keys, values, a, c, g, 3.0, causal=causal, mask=None, null_slot=True)
    assert fast.dtype == torch.float64 and rel_err(fast, ref) <= 1e-12


@pytest.mark.parametrize("null_slot", [True, False], ids=["null", "nonull"])
@pytest.mark.parametrize("omega", [2.0, 30.0], ids=["leaky", "calibrated"])
def test_head_group_cache_matches_full(omega, null_slot):
    gen = torch.Generator().manual_seed(7)
    B, T, F, M = 2, sum(CHUNKS), 10, 3
    keys, values = torch.randn(B, T, F, generator=gen) * 2, torch.randn(B, T, F, generator=gen)
    a, c, g = torch.rand(M, F, generator=gen) + 0.5, torch.rand(M, F, generator=gen) - 0.5, torch.randn(M, F)
    cache = fastpath.HeadGroupCache(a, c, g, omega, null_slot=null_slot)
    stepped = chunked(cache.step, keys, values)
    full, ref = both(keys, values, a, c, g, omega, causal=True, mask=None, null_slot=null_slot)
    assert rel_err(stepped, ref) <= TOL and rel_err(full, ref) <= TOL
    assert cache.state.z0.shape == cache.state.S0.shape == (M, B, 1, F), "state does not grow with the length"


def test_head_group_cache_with_left_padding():
    gen = torch.Generator().manual_seed(8)
    B, T, F = 2, sum(CHUNKS), 6
    keys, values, a, c, g, _, _ = group_case("gelu_mixture", B, T, F, gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False  # inside the first chunk
    mask[0, 6] = False  # a padded single-token step
    cache = fastpath.HeadGroupCache(a, c, g, 2.0)
    stepped = chunked(cache.step, keys, values, mask)
    _, ref = both(keys, values, a, c, g, 2.0, causal=True, mask=mask, null_slot=True)
    assert rel_err(stepped, ref, mask) <= TOL


def test_head_group_cache_recomputes_unsafe_columns():
    """The cache's past sums feed the exact fallback too: a huge key in the prompt, leaky keys after."""
    gen = torch.Generator().manual_seed(10)
    B, T, F = 1, sum(CHUNKS), 4
    keys = 60 + 10 * torch.rand(B, T, F, generator=gen)
    keys[:, 30, :2] = 200.0
    values = torch.randn(B, T, F, generator=gen)
    one = torch.ones(1, F)
    cache = fastpath.HeadGroupCache(one, 0 * one, one, 50.0)
    stepped = chunked(cache.step, keys, values)
    _, ref = both(keys, values, one, 0 * one, one, 50.0, causal=True, mask=None, null_slot=True)
    assert rel_err(stepped, ref) <= TOL


@pytest.mark.parametrize("omega", [2.0, 30.0], ids=["leaky", "calibrated"])
def test_product_pairs_cache_matches_full(omega):
    gen = torch.Generator().manual_seed(11)
    B, T, F = 2, sum(CHUNKS), 8
    s, u = torch.randn(B, T, F, generator=gen) * 3, torch.randn(B, T, F, generator=gen)
    eps = torch.full((F,), 1e-4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :3] = False
    mask[0, 6] = False  # a padded single-token step
    cache = fastpath_pairs.ProductPairsCache(eps, omega)
    stepped = chunked(cache.step, s, u, mask)
    ref = dense_product_pairs(s.double(), u.double(), eps.double(), omega, causal=True, key_padding_mask=mask)
    assert rel_err(stepped, ref, mask) <= TOL
    assert cache.sums.shape == (B, 1, 4, F)


@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 9, 64, 65, 300, 1000])
def test_exclusive_prefix_sum(T):
    x = torch.randn(3, T, 5, dtype=torch.float64)
    expected = x.cumsum(dim=1) - x
    assert torch.allclose(fastpath.exclusive_prefix_sum(x), expected, rtol=0, atol=1e-12)
    xf = x.float()
    err = (fastpath.exclusive_prefix_sum(xf).double() - expected).abs().max() / x.abs().sum(dim=1).max()
    assert err <= 1e-7  # fp32: each sum a few short dot products deep


def test_dense_reference_is_the_attention_described():
    """The reference against the closed forms: SiLU without leakage, and a 2-token causal head by hand."""
    gen = torch.Generator().manual_seed(12)
    u = torch.randn(2, 9, 5, generator=gen, dtype=torch.float64)
    one = torch.ones(1, 5, dtype=torch.float64)
    silu = dense_head_group(u, u, one, 0 * one, one, 60.0, causal=True)
    assert torch.allclose(silu, Fn.silu(u), rtol=0, atol=1e-15)
    a, c, g, omega = 1.5, -0.5, 2.0, 1.0
    k, v = torch.tensor([[[0.3], [-1.2]]], dtype=torch.float64), torch.tensor([[[0.7], [2.0]]], dtype=torch.float64)
    z = a * k.flatten() + c
    w = torch.exp(torch.stack([omega + z[1], omega + 0 * z[1], z[0]]))  # query 1: self, null, key 0
    expected1 = g * (w[0] * v[0, 1, 0] + w[2] * v[0, 0, 0]) / w.sum()
    expected0 = g * v[0, 0, 0] * torch.sigmoid(z[0])
    t = lambda x: torch.tensor([[x]], dtype=torch.float64)
    out = dense_head_group(k, v, t(a), t(c), t(g), omega, causal=True)
    assert torch.allclose(out.flatten(), torch.stack([expected0, expected1]), rtol=1e-14, atol=0)


def _threshold_omega(keys, a, c, mask, offset):
    """Omega at which the leakage bound 2 n e^{Z - omega} is e^-offset times e^NEGLIGIBLE_LEAK.
    Z bounds every column's largest real key from the real inputs' max and min."""
    real = keys[mask]  # (N, F)
    Z = float(torch.maximum(a * real.max(), a * real.min()).add(c).max())
    return Z + math.log(2 * keys.shape[1]) - fastpath.NEGLIGIBLE_LEAK + offset


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_self_only_evaluation_is_taken_only_where_leakage_is_negligible(monkeypatch, causal, T):
    """Omega a little past the bound: the group is evaluated from self and null slots alone and agrees
    with the full O(n) evaluation (leakage included) to float64 rounding; Omega a little short of it:
    the full evaluation runs."""
    gen = torch.Generator().manual_seed(T + 3)
    B, F = 2, 12
    keys, values, a, c, g, _, null_slot = group_case("gelu_mixture", B, T, F, gen)
    keys, values, a, c, g = (t.double() for t in (keys, values, a, c, g))
    calls = []
    real = fastpath._self_only_group
    monkeypatch.setattr(fastpath, "_self_only_group", lambda *args: calls.append(1) or real(*args))
    mask = padding(B, T, causal, gen)
    run = lambda omega: fastpath.fast_head_group(keys, values, a, c, g, omega, causal=causal, key_padding_mask=mask)

    short = run(_threshold_omega(keys, a, c, mask, -1.0))
    assert calls == []
    past = run(omega := _threshold_omega(keys, a, c, mask, +1.0))
    assert calls, "a negligible leakage must take the self-only evaluation"
    monkeypatch.setattr(fastpath, "NEGLIGIBLE_LEAK", -math.inf)  # force the full evaluation
    full = run(omega)
    assert rel_err(past, full, mask) <= 1e-15
    assert rel_err(past, no_leak(keys, values, a, c, g, null_slot), mask) <= 1e-15
    assert torch.isfinite(short).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_product_pairs_self_only_agrees_with_the_full_evaluation(monkeypatch, causal):
    gen = torch.Generator().manual_seed(11)
    B, T, F = 2, 200, 12
    s = torch.randn(B, T, F, generator=gen, dtype=torch.float64) * 3
    u = torch.randn(B, T, F, generator=gen, dtype=torch.float64)
    eps = torch.full((F,), 1e-4, dtype=torch.float64)
    omega = float(eps.max() * s.abs().amax()) + math.log(2 * T) - fastpath.NEGLIGIBLE_LEAK + 1.0
    mask = padding(B, T, causal, gen)
    calls = []
    real = fastpath_pairs._pair_self_only
    monkeypatch.setattr(fastpath_pairs, "_pair_self_only", lambda *args: calls.append(1) or real(*args))
    past = fastpath_pairs.fast_product_pairs(s, u, eps, omega, causal=causal, key_padding_mask=mask)
    assert calls
    monkeypatch.setattr(fastpath_pairs, "NEGLIGIBLE_LEAK", -math.inf)
    full = fastpath_pairs.fast_product_pairs(s, u, eps, omega, causal=causal, key_padding_mask=mask)
    assert len(calls) == 1
    assert rel_err(past, full, mask) <= 1e-13  # the full form's cosh/sinh identity: ~e^{2 max|eps s|} ulps
    assert rel_err(past, s * u, mask) <= 1e-6  # and the pair is the product up to (eps s)^2 / 12


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_self_only_one_mixture_for_every_unit(causal):
    """The converter's heads share one mixture across units ((M, 1) expanded to (M, F)): the
    self-only evaluation takes scalar operands then, and agrees with per-unit operands."""
    gen = torch.Generator().manual_seed(21)
    B, T, F, M = 2, 50, 24, 5
    u = torch.randn(B, T, F, generator=gen) * 3
    a, c, g = (torch.randn(M, 1, generator=gen).expand(M, F) for _ in range(3))
    mask = padding(B, T, causal, gen)
    shared = fastpath.fast_head_group(u, u, a, c, g, 1e3, causal=causal, key_padding_mask=mask)
    per_unit = fastpath.fast_head_group(u, u, a.contiguous(), c.contiguous(), g.contiguous(), 1e3,
                                        causal=causal, key_padding_mask=mask)
    assert rel_err(shared, per_unit.double(), mask) <= 1e-6
    assert rel_err(shared, no_leak(u, u, a, c, g, True), mask) <= 1e-6
