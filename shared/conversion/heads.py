"""Neuron-head groups evaluated as ordinary softmax attention: the dense reference.

A *head group* replaces one FFN sublayer (DESIGN.md §2). Head (m, k) belongs to
unit k and has head dimension 1:

    query      the constant 1
    key        z_jmk = a[m, k] * keys_in[j, k] + c[m, k]
    value      values_in[j, k]
    self bias  +omega on the score of key j = i
    null slot  score omega, value 0 (absent for identity heads)
    output     g[m, k] * attention, summed over m into column k

so the scores for query i are: self omega + z_i, null omega, every other visible
key z_j. This module evaluates exactly that with
`torch.nn.functional.scaled_dot_product_attention`, one head per (m, k), in
O(T^2) per head. It is the reference that `fastpath.py` is tested against; it is
slow by design. Padded keys are invisible; a padded query still sees itself, so
every softmax row is finite (outputs at padded queries carry no meaning).
"""
import torch
import torch.nn.functional as Fn

MAX_SCORE_BYTES = 256 * 2**20  # per chunk of heads: 64M fp32 (32M fp64) scores


def score_bias(T, omega, *, causal, key_padding_mask=None, null_slot=True, dtype=torch.float32, device=None):
    """Additive score bias (B or 1, 1, T, T + 1): the last column is the null slot."""
    visible = torch.ones(T, T, dtype=torch.bool, device=device)  # (T, T) query i, key j
    if causal:
        visible = visible.tril()
    visible = visible.view(1, 1, T, T)
    if key_padding_mask is not None:
        assert key_padding_mask.shape[1] == T and key_padding_mask.dtype == torch.bool
        visible = visible & key_padding_mask.to(device)[:, None, None, :]  # (B, 1, T, T)
    eye = torch.eye(T, dtype=torch.bool, device=device).view(1, 1, T, T)
    visible = visible | eye  # a query always sees itself: no empty rows
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
    bias = bias + eye.to(dtype) * omega  # self-position bias
    null = torch.full((*bias.shape[:3], 1), omega if null_slot else float("-inf"), dtype=dtype, device=device)
    return torch.cat((bias, null), dim=3)  # (B or 1, 1, T, T + 1)


def dense_head_group(keys_in, values_in, a, c, g, omega, *, causal, key_padding_mask=None, null_slot=True):
    """out[b, i, k] = sum_m g[m, k] * attention of head (m, k) at query i. Shapes in the module doc."""
    B, T, F = keys_in.shape
    M = a.shape[0]
    assert values_in.shape == (B, T, F) and a.shape == c.shape == g.shape == (M, F)
    dtype, device = keys_in.dtype, keys_in.device
    bias = score_bias(T, float(omega), causal=causal, key_padding_mask=key_padding_mask,
                      null_slot=null_slot, dtype=dtype, device=device)
    heads_per_chunk = max(1, MAX_SCORE_BYTES // (keys_in.element_size() * B * T * (T + 1)))
    a, c, g = (t.to(dtype).reshape(M * F) for t in (a, c, g))  # head h = m * F + k
    out = torch.zeros(B, T, F, dtype=dtype, device=device)
    for h0 in range(0, M * F, heads_per_chunk):
        h = torch.arange(h0, min(h0 + heads_per_chunk, M * F), device=device)  # (H,)
        unit = h % F
        z = a[h] * keys_in[:, :, unit] + c[h]  # (B, T, H)
        out.index_add_(2, unit, g[h] * _attend(z, values_in[:, :, unit], bias))
    return out


def _attend(z, v, bias):
    """Head-dimension-1 attention with query 1 and a zero null key/value. z, v: (B, T, H) -> (B, T, H)."""
    B, T, H = z.shape
    zero = z.new_zeros(B, H, 1, 1)
    keys = torch.cat((z.transpose(1, 2).unsqueeze(3), zero), dim=2)  # (B, H, T + 1, 1)
    values = torch.cat((v.transpose(1, 2).unsqueeze(3), zero), dim=2)  # (B, H, T + 1, 1)
    query = z.new_ones(B, H, T, 1)
    y = Fn.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=1.0)  # (B, H, T, 1)
    return y.squeeze(3).transpose(1, 2)  # (B, T, H)


def product_pair_heads(eps):
    """(a, c, g) of the two heads per unit that form a product pair (DESIGN.md §4): (2, F) each."""
    a = torch.stack((eps, -eps))
    return a, torch.zeros_like(a), torch.stack((2.0 / eps, -2.0 / eps))


def dense_product_pairs(s, u, eps, omega, *, causal, key_padding_mask=None):
    """Sum of head+ (key +eps s, value (2/eps) u) and head- (key -eps s, value -(2/eps) u), null slots.

    s, u: (B, T, F); eps: (F,). Without leakage this is (2/eps) u tanh(eps s / 2) ~ s u.
    """
    a, c, g = product_pair_heads(eps.to(s.dtype))
    return dense_head_group(s, u, a, c, g, omega, causal=causal, key_padding_mask=key_padding_mask)
